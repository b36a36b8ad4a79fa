"""The Review panel's "Improve the model from reviewed cases" section (wiring only).

The fine-tune is :func:`segmote_core.finetune.finetune_from_store` (the same one ``segmote train
--corrections`` runs), in a thread worker with a napari progress bar and Cancel. A cancelled run
leaves the old model in place and its resumable state beside the target file: the next click
continues it. A finished run writes ``<store>.models/improved-N.safetensors`` (its JSON holds the
lineage), shows the validation Dice before and after, and offers the new model: "Use the
improved model" loads it into the SegMoTE annotator for the rest of the session (its embedding
cache stays valid: the encoder did not change).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from magicgui.widgets import Container, FileEdit, Label, PushButton
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from superqt.utils import create_worker

from segmote_core.progress import CancelToken, Cancelled, callback_steps

__all__ = ["ImprovePanel", "next_model_path"]

log = logging.getLogger(__name__)


def next_model_path(store_path: Path) -> Path:
    """``<store>.models/improved-N.safetensors``: the one a cancelled run left a state for, else
    the first free N."""
    folder = store_path.with_name(store_path.name + ".models")
    n = 1
    while True:
        path = folder / f"improved-{n}.safetensors"
        if path.with_suffix(".finetune_state.pt").exists() or not path.exists():
            return path
        n += 1


class ImprovePanel(Container):
    """Fine-tune from the store's reviewed cases; offer the result to the annotator."""

    def __init__(self, review: Any) -> None:
        super().__init__(scrollable=False)
        self.review = review
        self.config: Any = None          # a FineTuneConfig (None: its defaults)
        self.worker: Any = None
        self._token: CancelToken | None = None
        self.result: Any = None          # the FineTuneResult of the last run
        self.model_path: Path | None = None
        self.parent_model = FileEdit(label="pre-labels' model", mode="r", nullable=True,
                                     filter="*.safetensors",
                                     tooltip="the checkpoint that made the pre-labels "
                                             "(empty: the bundled demo model)")
        self.improve_button = PushButton(text="Improve the model from reviewed cases")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.use_button = PushButton(text="Use the improved model", enabled=False)
        self.result_label = Label(value="")
        self.result_label.native.setWordWrap(True)
        row = Container(widgets=[self.improve_button, self.cancel_button], layout="horizontal",
                        labels=False)
        row.margins = (0, 0, 0, 0)
        self.extend([self.parent_model, row, self.use_button, self.result_label])
        self.improve_button.clicked.connect(review._guard(self.improve))
        self.cancel_button.clicked.connect(review._guard(self.cancel))
        self.use_button.clicked.connect(review._guard(self.use_model))

    def improve(self, config: Any = None) -> Any:
        """Start the fine-tune in a thread worker (``config``: a ``FineTuneConfig``); returns
        the worker. torch loads here, not with the panel."""
        from segmote_core.finetune import FineTuneConfig, finetune_from_store

        store = self.review.store
        if store is None:
            raise ValueError("load an output store first")
        if self.worker is not None:
            raise RuntimeError("the model is already being improved")
        cfg = config or self.config or FineTuneConfig()
        parent = Path(str(self.parent_model.value)) if self.parent_model.value else "demo"
        target = next_model_path(store.path)
        token = CancelToken()

        def work():
            try:
                return (yield from callback_steps(lambda report: finetune_from_store(
                    store.path, parent, target, config=cfg, progress=report, cancel=token)))
            except Cancelled:
                return None

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        bar = progress(total=0, desc="SegMoTE: improving the model")

        def on_yield(value: tuple[int, int]) -> None:
            done, total = value
            bar.total = total
            bar.update(done - bar.n)

        def on_return(result: Any) -> None:
            if result is None:
                self._status(f"cancelled: the model in use is unchanged; press Improve again "
                             f"to resume ({target.with_suffix('.finetune_state.pt').name})")
                return
            self.result, self.model_path = result, target
            self.use_button.enabled = True
            self._status(f"validation Dice {result.dice_before:.3f} -> {result.dice_after:.3f} "
                         f"on {', '.join(result.val_cases)} (trained on "
                         f"{len(result.train_cases)} case(s), best step {result.best_step} of "
                         f"{result.steps}); saved {target}")
            show_info(f"SegMoTE: improved model ready (Dice {result.dice_before:.3f} -> "
                      f"{result.dice_after:.3f})")

        def on_error(exc: BaseException) -> None:
            log.error("improving the model failed: %s", exc, exc_info=exc)
            show_error(f"SegMoTE: improving the model failed: {exc}")
            self._status(f"error: {exc}")

        def on_finish() -> None:
            bar.close()
            self.worker, self._token = None, None
            self.improve_button.enabled, self.cancel_button.enabled = True, False

        worker.yielded.connect(on_yield)
        worker.returned.connect(on_return)
        worker.errored.connect(on_error)
        worker.finished.connect(on_finish)
        self.worker, self._token = worker, token
        self.improve_button.enabled, self.cancel_button.enabled = False, True
        self._status(f"improving the model from the reviewed cases of {store.path.name} ...")
        worker.start()
        return worker

    def cancel(self) -> None:
        if self._token is not None:
            self._token.cancel()

    def use_model(self) -> Any:
        """Load the improved model into the SegMoTE annotator (docked if needed); returns the
        annotator widget (it loads in its own worker)."""
        if self.model_path is None:
            raise ValueError("improve the model first")
        from ._models import CHECKPOINT

        _, widget = self.review.viewer.window.add_plugin_dock_widget("segmote",
                                                                     "SegMoTE annotator")
        widget.source.value = CHECKPOINT
        widget.segmote_checkpoint.value = self.model_path
        self._status(f"loading {self.model_path.name} into the annotator")
        widget.load_model()
        return widget

    def _status(self, text: str) -> None:
        self.result_label.value = text
        self.review._set_status(text)
