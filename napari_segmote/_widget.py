"""The SegMoTE dock widget: controls and shortcuts wired to :class:`AnnotatorController`.

Wiring only: every button calls one controller method through :meth:`SegMoTEWidget._guard`,
which turns any exception into a napari notification so the viewer stays usable.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, Label, PushButton,
                              SpinBox)
from napari.utils.notifications import show_error
from superqt.utils import create_worker  # the QThread worker napari's own wraps

from segmote_core.device import available_devices
from segmote_core.trained import auto_unavailable
from segmote_core.transforms import CT_WINDOWS

from ._controller import AnnotatorController
from ._models import CHECKPOINT, DEMO, MODEL_SOURCES, load_choice

__all__ = ["SegMoTEWidget", "SHORTCUTS"]

log = logging.getLogger(__name__)

MODALITIES = ("auto", "CT", "MR", "MR_T1W", "PET", "XR", "DERM")
#: key -> controller action (documented in docs/napari.md).
SHORTCUTS = {"Shift-C": "commit", "Shift-X": "clear", "Shift-U": "undo",
             "Shift-N": "next_slice", "Shift-B": "previous_slice", "Shift-T": "toggle_sign"}


class SegMoTEWidget(Container):
    """Interactive SegMoTE annotation: model, image, prompts, commit/undo, volume and auto."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(scrollable=False)
        self.viewer = napari_viewer
        self.controller = AnnotatorController(napari_viewer)
        self._loader: Any = None

        self.image = ComboBox(label="image", choices=self._image_layers, nullable=True)
        self.source = ComboBox(label="model", choices=MODEL_SOURCES, value=DEMO)
        self.sam_checkpoint = FileEdit(label="SAM .pth", mode="r", nullable=True,
                                       filter="*.pth", visible=False)
        self.segmote_checkpoint = FileEdit(label="SegMoTE weights", mode="r", nullable=True,
                                           filter="*.safetensors", visible=False)
        self.model_type = ComboBox(label="SAM size", choices=("vit_b", "vit_l", "vit_h", "tiny"),
                                   visible=False)
        self.device = ComboBox(
            label="device", choices=available_devices(), value="auto",
            tooltip="auto: the GPU (CUDA, then Apple MPS) when there is one, else the CPU; "
                    "embeddings are computed there (bf16 where the hardware has it)")
        self.load_button = PushButton(text="Load model")
        self.modality = ComboBox(label="modality", choices=MODALITIES, value="auto")
        self.window = ComboBox(label="CT window", choices=tuple(CT_WINDOWS), value="soft_tissue")
        self.cache_dir = FileEdit(label="embedding cache", mode="d", nullable=True)
        self.start_button = PushButton(text="Start annotating")
        self.embed_slice_button = PushButton(text="Embed slice")
        self.embed_volume_button = PushButton(text="Embed volume")
        self.cancel_button = PushButton(text="Cancel")
        self.negative = CheckBox(text="negative points (Shift-T)")
        self.category = ComboBox(
            label="category", choices=self._categories, nullable=True,
            tooltip="text guide: which structure the box or points mean (the model's "
                    "vocabulary), e.g. white matter rather than the whole brain")
        self.commit_button = PushButton(text="Commit (Shift-C)")
        self.clear_button = PushButton(text="Clear (Shift-X)")
        self.undo_button = PushButton(text="Undo (Shift-U)")
        self.next_button = PushButton(text="Next slice (Shift-N)")
        self.propagate_button = PushButton(text="Segment volume")
        self.max_slices = SpinBox(label="propagate at most", min=0, max=10_000, value=0,
                                  tooltip="slices each way; 0: until the object ends")
        self.auto_slice_button = PushButton(text="Auto (PPT): slice")
        self.auto_volume_button = PushButton(text="Auto (PPT): volume")
        self.heatmap = CheckBox(text="show routing heat map")
        self.refine_layer = ComboBox(label="refine from", choices=self._labels_layers, nullable=True)
        self.refine_id = SpinBox(label="object id", min=1, max=2**31 - 1, value=1)
        self.refine_button = PushButton(text="Refine object (mask prompt)")
        self.status = Label(value="load a model to start")
        self.status.native.setWordWrap(True)
        def row(*widgets: Any) -> Container:
            box = Container(widgets=widgets, layout="horizontal", labels=False)
            box.margins = (0, 0, 0, 0)
            return box

        self.extend([
            self.image, self.source, self.sam_checkpoint, self.segmote_checkpoint,
            self.model_type, self.device, self.load_button, self.modality, self.window, self.cache_dir,
            self.start_button,
            row(self.embed_slice_button, self.embed_volume_button, self.cancel_button),
            self.negative, self.category,
            row(self.commit_button, self.clear_button, self.undo_button),
            row(self.next_button, self.propagate_button), self.max_slices,
            row(self.auto_slice_button, self.auto_volume_button),
            self.heatmap, self.refine_layer, self.refine_id, self.refine_button, self.status,
        ])
        self._connect()
        self.pick_image()

    # ------------------------------------------------------------------ wiring
    def _connect(self) -> None:
        c = self.controller
        c.on_status = self._set_status
        c.on_model = self._on_model
        g = self._guard
        self.source.changed.connect(self._on_source)
        self.load_button.clicked.connect(g(self.load_model))
        self.start_button.clicked.connect(g(self.start))
        self.embed_slice_button.clicked.connect(g(lambda: c.embed([c.z])))
        self.embed_volume_button.clicked.connect(g(lambda: c.embed(None)))
        self.cancel_button.clicked.connect(g(c.cancel))
        self.negative.changed.connect(g(c.set_negative))
        self.category.changed.connect(g(c.set_category))
        self.commit_button.clicked.connect(g(c.commit))
        self.clear_button.clicked.connect(g(c.clear))
        self.undo_button.clicked.connect(g(c.undo))
        self.next_button.clicked.connect(g(c.next_slice))
        self.propagate_button.clicked.connect(
            g(lambda: c.propagate(self.max_slices.value or None)))
        self.auto_slice_button.clicked.connect(g(lambda: c.auto(volume=False)))
        self.auto_volume_button.clicked.connect(g(lambda: c.auto(volume=True)))
        self.heatmap.changed.connect(g(c.set_heatmap))
        self.refine_button.clicked.connect(
            g(lambda: c.refine(self.refine_layer.value, self.refine_id.value)))
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.layers.selection.events.active.connect(self.pick_image)
        actions = {
            "commit": c.commit, "clear": c.clear, "undo": c.undo,
            "next_slice": lambda: c.next_slice(1), "previous_slice": lambda: c.next_slice(-1),
            "toggle_sign": lambda: setattr(self.negative, "value", not self.negative.value),
        }
        for key, name in SHORTCUTS.items():
            action = g(actions[name])
            self.viewer.bind_key(key, lambda _viewer, a=action: a(), overwrite=True)

    def _on_model(self, model: Any) -> None:
        self.category.reset_choices()
        # No prompt-free mode without a trained PPT (LiteMedSAM or SAM alone, a checkpoint
        # saved untrained): the buttons say why and what to do instead.
        reason = auto_unavailable(model)
        for button in (self.auto_slice_button, self.auto_volume_button):
            button.enabled = reason is None
            button.tooltip = reason or ""
        if reason:
            self._set_status(f"Auto (PPT) is off: {reason}")

    def _guard(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Run ``func``; report any exception as a napari error notification."""
        @functools.wraps(func)
        def wrapper(*args: Any) -> Any:
            try:
                return func(*args)
            except Exception as exc:
                log.exception("SegMoTE action failed")
                show_error(f"SegMoTE: {exc}")
                self._set_status(f"error: {exc}")
                return None
        return wrapper

    def _set_status(self, text: str) -> None:
        self.status.value = text

    def _image_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if layer.__class__.__name__ == "Image" and not layer.name.startswith("SegMoTE")]

    def _on_layers_changed(self, _event: Any = None) -> None:
        self.reset_choices()
        self.pick_image()

    def pick_image(self, _event: Any = None) -> Any:
        """Choose the selected image layer, else keep the choice, else take the only one.

        As micro-sam's annotators do: opening the widget on a viewer with an image (or
        clicking another image in the layer list) makes that the image to annotate. Selecting a
        non-image layer (the prompt layers) leaves the choice alone. Returns the choice.
        """
        # napari hands plugins proxies of its layers (a new one per access): compare by name,
        # which is unique within a viewer
        images = {name: layer for name, layer in self._image_layers()}
        active = self.viewer.layers.selection.active
        current = self.image.value
        chosen = images.get(getattr(current, "name", None))
        if active is not None and active.name in images:
            chosen = images[active.name]
        elif chosen is None and len(images) == 1:
            chosen = next(iter(images.values()))
        if getattr(current, "name", None) != getattr(chosen, "name", None):
            self.image.value = chosen
        return chosen

    def _categories(self, _widget: Any = None) -> list[str]:
        return list(self.controller.categories())

    def _labels_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if layer.__class__.__name__ == "Labels"]

    def _on_source(self, source: str) -> None:
        ckpt = source == CHECKPOINT
        for w in (self.sam_checkpoint, self.segmote_checkpoint, self.model_type):
            w.visible = ckpt

    # ------------------------------------------------------------------ actions
    def load_model(self) -> Any:
        """Load the chosen model in a worker (checkpoints can take seconds)."""
        if self._loader is not None:
            raise RuntimeError("a model is already loading")
        args = (self.source.value, self.sam_checkpoint.value, self.segmote_checkpoint.value,
                self.model_type.value, self.device.value)
        worker = create_worker(load_choice, *args, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._guard(self.controller.set_model))
        worker.errored.connect(self._on_load_error)

        def done() -> None:
            self._loader = None
        worker.finished.connect(done)
        self._loader = worker
        self._set_status("loading model ...")
        worker.start()
        return worker

    def _on_load_error(self, exc: BaseException) -> None:
        log.error("could not load the model: %s", exc, exc_info=exc)
        show_error(f"SegMoTE: could not load the model: {exc}")
        self._set_status(f"error: could not load the model: {exc}")

    def start(self) -> Any:
        window = self.window.value if self.modality.value in ("CT", "auto") else None
        return self.controller.start(self.image.value, self.modality.value, window,
                                     str(self.cache_dir.value) if self.cache_dir.value else None)
