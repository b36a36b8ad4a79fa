"""Glue between a ``segmote_core.session.AnnotationSession`` and a napari viewer.

The controller reads prompts from the plugin's layers, calls the session, refreshes layers and
runs the long steps (embeddings, propagation, auto mode) in napari thread workers with a
progress bar and a cancel. The widget only forwards its buttons and shortcuts here; the
numerical work lives in the session.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import numpy as np
from napari.layers import Image
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from superqt.utils import create_worker  # the QThread worker napari's own wraps

from segmote_core.embeddings import EmbeddingStore
from segmote_core.modeling import SegMoTE
from segmote_core.predictor import SegMoTEPredictor
from segmote_core.progress import CancelToken, Cancelled
from segmote_core.prompts import box_on_slice, object_mask, points_on_slice, prompted_slices
from segmote_core.session import AnnotationSession, SlicePrediction
from segmote_core.volume import PropagationConfig

from . import layers as viewer_layers
from .layers import BOXES, COMMITTED, CURRENT, HEATMAP, NEGATIVE, POINTS, POSITIVE

__all__ = ["AnnotatorController"]

log = logging.getLogger(__name__)

Steps = Callable[[CancelToken], Iterator[tuple[int, int]]]
_FINAL_ACTIONS = {"added", "removed", "changed"}


class AnnotatorController:
    """State of the annotator in one viewer (one model, at most one session, one worker)."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.model: SegMoTE | None = None
        self.predictor: SegMoTEPredictor | None = None
        self.session: AnnotationSession | None = None
        self.image_layer: Any = None
        self.layers: dict[str, Any] = {}
        self.show_heatmap = False
        self.worker: Any = None
        self._cancel: CancelToken | None = None
        self._muted = False
        self._pending: Callable[[], Any] | None = None
        self.on_status: Callable[[str], None] = lambda text: None
        self.on_model: Callable[[SegMoTE], None] = lambda model: None
        self.category: str | None = None

    # ------------------------------------------------------------------ setup
    def set_model(self, model: SegMoTE) -> None:
        self.model = model.eval()
        self.predictor = SegMoTEPredictor(model)
        self.session = None
        self.category = None
        self.on_model(model)
        self.on_status(f"model ready: {model.config.model_type}, "
                       f"{model.config.num_experts} experts, on {model.device.type}"
                       f"{' (bf16)' if self.predictor.bf16 else ''}")

    def categories(self) -> tuple[str, ...]:
        """The loaded model's text vocabulary (empty without a text guide)."""
        return self.predictor.categories if self.predictor is not None else ()

    def set_category(self, name: str | None) -> None:
        """Text guide for the prompts (which structure a box or point means); ``None``: off.

        Re-runs the decoder when the current slice has prompts.
        """
        if name is not None and name not in self.categories():
            raise ValueError(f"unknown category {name!r}; this model knows "
                             f"{list(self.categories())}")
        self.category = name
        if self.session is not None and self.image_layer is not None:
            p = self.prompts()
            if p["points"] is not None or p["box"] is not None:
                self.update_prediction()

    def start(self, image_layer: Any, modality: str = "auto", window: Any = None,
              cache_dir: str | None = None) -> AnnotationSession:
        """Start annotating ``image_layer``: new session, fresh prompt and label layers."""
        if self.predictor is None:
            raise RuntimeError("no model loaded: choose a model and press 'Load model' first")
        if not isinstance(image_layer, Image):
            raise TypeError(f"choose an Image layer to annotate, got {image_layer!r}")
        self.cancel()
        meta = viewer_layers.segmote_meta(image_layer)
        if modality == "auto" and meta.get("modality"):
            modality = str(meta["modality"])
        data = image_layer.data
        if isinstance(data, (list, tuple)):  # multiscale: the full-resolution level
            data = data[0]
        session = AnnotationSession(data, self.predictor, rgb=bool(image_layer.rgb),
                                    modality=modality, window=window)
        if cache_dir:
            session.store = EmbeddingStore.on_disk(cache_dir, self.predictor, data,
                                                   session.n_slices, modality, window)
        else:
            cfg = self.predictor.model.config
            per_slice = 4 * cfg.embedding_size ** 2 * (
                cfg.preset.prompt_dim + (cfg.preset.embed_dim if cfg.hq_fusion else 0))
            if per_slice * session.n_slices > 2 * 2 ** 30:
                show_info(f"SegMoTE: embedding all {session.n_slices} slices would take "
                          f"{per_slice * session.n_slices / 2 ** 30:.1f} GiB of memory; choose "
                          f"an embedding cache folder to keep them on disk")
        previous = self.viewer.layers[COMMITTED].data if COMMITTED in self.viewer.layers \
            else None
        if previous is not None and tuple(previous.shape) == session.shape:
            session.committed[:] = previous  # restarting keeps the committed objects
        self.session, self.image_layer = session, image_layer
        self._muted = True
        try:
            self.layers = viewer_layers.ensure_layers(self.viewer, image_layer,
                                                      session.current, session.committed)
        finally:
            self._muted = False
        self.layers[POINTS].events.data.connect(self.on_prompts_changed)
        self.layers[BOXES].events.data.connect(self.on_prompts_changed)
        self.on_status(f"annotating {image_layer.name!r} ({modality}); "
                       f"{session.n_slices} slice(s)")
        return session

    def _require(self) -> AnnotationSession:
        if self.session is None:
            raise RuntimeError("no annotation running: press 'Start annotating' first")
        return self.session

    @property
    def z(self) -> int:
        """The slice the viewer shows (0 for 2D images)."""
        self._require()
        z = viewer_layers.current_slice(self.viewer, self.image_layer)
        return 0 if z is None else z

    def _z_or_none(self) -> int | None:
        return self.z if self._require().is_volume else None

    # ------------------------------------------------------------------ prompting
    def set_negative(self, negative: bool) -> None:
        points = self.layers.get(POINTS)
        if points is not None:
            points.selected_data = set()  # napari applies "current" values to the selection
            points.feature_defaults = {"positive": not negative}
            points.current_face_color = NEGATIVE if negative else POSITIVE

    def on_prompts_changed(self, event: Any = None) -> None:
        """Points/Shapes data event: re-run the decoder on the current slice."""
        if self._muted or getattr(event, "action", "changed") not in _FINAL_ACTIONS:
            return
        try:
            self.update_prediction()
        except Exception as exc:  # a callback must never leave a traceback only in the console
            log.exception("prediction failed")
            show_error(f"SegMoTE: {exc}")

    def prompts(self, z: int | None = -1) -> dict[str, Any]:
        """The prompts of slice ``z`` (default: the current one): points, labels, box."""
        z = self._z_or_none() if z == -1 else z
        points = self.layers[POINTS]
        coords, labels = points_on_slice(points.data, points.features["positive"].to_numpy()
                                         if len(points.data) else [], z)
        shapes = self.layers[BOXES]
        box = box_on_slice(shapes.data, z, shapes.shape_type)
        return {"points": coords if len(coords) else None, "labels": labels, "box": box}

    def update_prediction(self, mask: np.ndarray | None = None) -> SlicePrediction | None:
        """Decode the current slice's prompts into the current-object layer.

        Computes the slice embedding in a worker first when it is missing.
        """
        session, z = self._require(), self.z
        kwargs = self.prompts()
        has_prompt = kwargs["points"] is not None or kwargs["box"] is not None or mask is not None
        if has_prompt and not session.has_embedding(z):
            if self.worker is not None:  # e.g. the volume is being embedded: decode after it
                self._pending = lambda: self.update_prediction(mask)
                self.on_status(f"slice {z}: waiting for its embedding ...")
            else:
                self.embed([z], then=lambda: self.update_prediction(mask))
            return None
        before = session.plane(session.current, z).copy()
        result = session.predict(z, mask=mask, text=self.category, **kwargs)
        viewer_layers.redraw_changed(self.layers[CURRENT], session.current, before,
                         z if session.is_volume else None)
        self._show(result)
        return result

    def _show(self, result: SlicePrediction | None) -> None:
        """Status line (and heat map) for a result whose mask is already drawn."""
        if result is None:
            self.on_status("no prompt on this slice")
            return
        conf = "n/a" if result.confidence is None else f"{result.confidence:.2f}"
        self.on_status(f"slice {result.z}: expert {result.expert} (token {result.token}), "
                       f"confidence {conf}, IoU score {result.score:.2f}, "
                       f"{int(result.mask.sum())} px")
        if self.show_heatmap and result.expert is not None and self._require().last is result:
            heat = self._require().routing_heatmap()[result.expert]
            layer = viewer_layers.show_heatmap(self.viewer, self.image_layer, heat,
                                               self._z_or_none())
            layer.visible = True

    def set_heatmap(self, show: bool) -> None:
        """Show the routing heat map of each new prediction (hide the layer when off)."""
        self.show_heatmap = bool(show)
        if HEATMAP in self.viewer.layers:
            self.viewer.layers[HEATMAP].visible = self.show_heatmap
        if self.show_heatmap and self.session is not None and self.session.last is not None:
            self._show(self.session.last)

    def refine(self, labels_layer: Any, object_id: int) -> SlicePrediction | None:
        """Use ``object_id`` of ``labels_layer`` on the current slice as the mask prompt."""
        if labels_layer is None:
            raise ValueError("choose a Labels layer holding the object to refine")
        session = self._require()
        if tuple(labels_layer.data.shape) != session.shape:
            raise ValueError(f"labels layer {labels_layer.name!r} has shape "
                             f"{labels_layer.data.shape}, the image {session.shape}")
        mask = object_mask(labels_layer.data, object_id, self._z_or_none())
        return self.update_prediction(mask=mask)

    # ------------------------------------------------------------------ objects
    def commit(self) -> int:
        label = self._require().commit()
        self._clear_prompts()
        self._refresh()
        self.on_status(f"committed object {label}")
        return label

    def clear(self) -> None:
        self._require().clear()
        self._clear_prompts()
        self._refresh()
        self.on_status("cleared the current object")

    def undo(self) -> int | None:
        label = self._require().undo()
        self._refresh()
        self.on_status("nothing to undo" if label is None else f"undid object {label}")
        return label

    def next_slice(self, step: int = 1) -> int | None:
        return viewer_layers.step_slice(self.viewer, self.image_layer, step)

    def _clear_prompts(self) -> None:
        self._muted = True
        try:
            self.layers[POINTS].data = np.empty((0, self.layers[POINTS].ndim))
            self.layers[BOXES].data = []
        finally:
            self._muted = False

    def _refresh(self) -> None:
        for name in (CURRENT, COMMITTED):
            if name in self.layers:
                self.layers[name].refresh()

    # ------------------------------------------------------------------ long work
    def embed(self, zs: list[int] | None = None, then: Callable[[], Any] | None = None) -> Any:
        """Embed slices ``zs`` (all by default) in a worker; ``then`` runs after success."""
        session = self._require()
        return self.run("SegMoTE embeddings", lambda c: session.embedding_steps(zs, c), then)

    def propagate(self, max_slices: int | None = None) -> Any:
        """Propagate every prompted slice (or the current slice's mask) through the volume.

        ``max_slices`` bounds the distance from a prompted slice (``None``: until the object
        ends by ``segmote_core.volume``'s stopping rule).
        """
        session, z = self._require(), self.z
        if not session.is_volume:
            raise ValueError("Segment volume needs a 3D image; this one is 2D")
        zs = prompted_slices(self.layers[POINTS].data, self.layers[BOXES].data)
        prompts = {k: self.prompts(k) for k in zs}
        if not zs and session.current[z].any():
            prompts = {z: {"mask": session.current[z].astype(bool)}}

        def report() -> None:
            res = session.propagation
            stops = ", ".join(f"{s.reason} at {s.z}" for s in res.stops)
            self.on_status(f"propagated: object on {len(res.slices)} slices "
                           f"({min(res.slices, default='-')}..{max(res.slices, default='-')}); "
                           f"stopped: {stops}")
        config = PropagationConfig(max_slices=max_slices)
        return self.run("SegMoTE propagation",
                        lambda c: session.propagate_steps(prompts, c, config), report)

    def auto(self, volume: bool) -> Any:
        """PPT auto mode on the current slice or every slice, into the current object; the
        selected category (if any) is the one PPT segments (its text token rides along)."""
        session = self._require()
        zs = None if volume else [self.z]

        def report() -> None:
            results = session.auto_results
            if len(results) == 1:
                self._show(next(iter(results.values())))
            else:
                found = sum(bool(r.mask.any()) for r in results.values())
                self.on_status(f"auto (PPT): object found on {found} of {len(results)} slices")
        text = self.category
        return self.run("SegMoTE auto (PPT)" + (f": {text}" if text else ""),
                        lambda c: session.auto_steps(zs, c, text=text), report)

    def run(self, desc: str, steps: Steps, then: Callable[[], Any] | None = None) -> Any:
        """Run a ``(done, total)`` generator in a thread worker with progress and cancel."""
        if self.worker is not None:
            raise RuntimeError("SegMoTE is busy: wait for the running task or press Cancel")
        token = CancelToken()
        gen = steps(token)
        cancelled: list[bool] = []
        failed: list[BaseException] = []

        def work() -> Iterator[tuple[int, int]]:
            try:
                yield from gen
            except Cancelled:
                cancelled.append(True)

        # errors become one napari notification (on_error); _ignore_errors stops superqt from
        # re-raising them in Qt's event loop
        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        pbar = progress(total=0, desc=desc)

        def on_yield(value: tuple[int, int]) -> None:
            done, total = value
            pbar.total = total
            pbar.update(done - pbar.n)
            self._refresh()

        def on_error(exc: BaseException) -> None:
            failed.append(exc)
            log.error("%s failed: %s", desc, exc, exc_info=exc)
            show_error(f"{desc} failed: {exc}")
            self.on_status(f"error: {desc} failed: {exc}")

        def on_finish() -> None:
            pbar.close()
            self.worker, self._cancel = None, None
            self._refresh()
            stopped = bool(cancelled) or worker.abort_requested
            if stopped:
                show_info(f"{desc}: cancelled")
                self.on_status(f"{desc}: cancelled")
            follow = [then] if not (failed or stopped) and then is not None else []
            if self._pending is not None:
                follow.append(self._pending)
                self._pending = None
            for func in follow:
                try:
                    func()
                except Exception as exc:
                    log.exception("%s: follow-up failed", desc)
                    show_error(f"SegMoTE: {exc}")

        worker.yielded.connect(on_yield)
        worker.errored.connect(on_error)
        worker.finished.connect(on_finish)
        self.worker, self._cancel = worker, token
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the running worker (it ends at the next slice)."""
        if self._cancel is not None:
            self._cancel.cancel()
        if self.worker is not None:
            self.worker.quit()
