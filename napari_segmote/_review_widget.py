"""The SegMoTE review dock widget: walk a ``segmote batch`` output worst first, correct, save.

Wiring only. The queue, the output store and the corrections store are
:mod:`segmote_core.review` (no Qt); the case's layers come from the reader
(:func:`napari_segmote._reader.output_case_layers`). The case's labels open as the annotator's
"committed objects" layer, so the SegMoTE annotator dock adopts them when it starts on the
case's image: points and boxes add objects, "Refine object" takes a pre-label object as its
mask prompt, and napari's paint / erase / fill edit the layer directly. This module imports no
torch: the model loads only when the annotator does.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from magicgui.widgets import Container, FileEdit, Label, PushButton, Select
from napari.utils.notifications import show_error, show_info

from segmote_core.review import (OutputStore, QueueEntry, SliceEntry, describe, edited_slices,
                                 open_output, review_queue, save_correction, slice_queue)

from ._reader import output_case_layers
from .layers import COMMITTED

__all__ = ["ReviewWidget"]

log = logging.getLogger(__name__)


def _ask(question: str) -> bool:
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(None, "SegMoTE review", question,
                                  QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


def _one(value: Any) -> Any:
    """The selected item of a single-selection list (magicgui may wrap it in a list)."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


class ReviewWidget(Container):
    """Review queue of a batch output: open a case, correct it, Save, Next."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(scrollable=False)
        self.viewer = napari_viewer
        self.store: OutputStore | None = None
        self.entries: list[QueueEntry] = []
        self.slices: list[SliceEntry] = []     # the cohort's slices, lowest QC first
        self._slice_pos = -1                   # index in ``slices`` last gone to
        self.case: str | None = None
        self.image_layer: Any = None
        self._baseline: np.ndarray | None = None   # the labels as opened or last saved
        self._prelabel: np.ndarray | None = None
        #: asks the user a yes/no question (replaced in tests)
        self.confirm: Callable[[str], bool] = _ask

        self.path = FileEdit(label="output store", mode="d",
                             tooltip="the OUT.zarr of segmote batch")
        self.corrections = FileEdit(label="corrections", mode="d", nullable=True,
                                    tooltip="where Save writes (default: <store>/corrections)")
        self.load_button = PushButton(text="Load queue")
        self.queue = Select(label="cases (lowest QC first)", choices=[], allow_multiple=False)
        self.queue.native.setMinimumHeight(160)
        self.open_button = PushButton(text="Open")
        self.worst = Select(label="worst slices (click: go)", choices=[], allow_multiple=False)
        self.worst.native.setMinimumHeight(90)
        self.annotate_button = PushButton(text="Annotate with SegMoTE")
        self.save_button = PushButton(text="Save")
        self.next_button = PushButton(text="Next")
        self.next_slice_button = PushButton(
            text="Next worst slice", tooltip="the next pending slice of the cohort, lowest QC "
                                             "first, whatever its case (review_slices.csv)")
        self.status = Label(value="choose the output store of segmote batch")
        self.status.native.setWordWrap(True)
        row = Container(widgets=[self.save_button, self.next_button, self.next_slice_button],
                        layout="horizontal", labels=False)
        row.margins = (0, 0, 0, 0)
        from ._improve import ImprovePanel

        self.improve = ImprovePanel(self)   # fine-tune from the reviewed cases
        self.extend([self.path, self.corrections, self.load_button, self.queue,
                     self.open_button, self.worst, self.annotate_button, row, self.improve,
                     self.status])
        g = self._guard
        self.load_button.clicked.connect(g(lambda: self.load(self.path.value,
                                                             self.corrections.value)))
        self.open_button.clicked.connect(g(self._open_selected))
        self.save_button.clicked.connect(g(self.save))
        self.next_button.clicked.connect(g(self.next))
        self.next_slice_button.clicked.connect(g(self.next_slice))
        self.annotate_button.clicked.connect(g(self.annotate))
        self.worst.changed.connect(g(self._go_to_selected_slice))

    # ------------------------------------------------------------------ wiring helpers
    def _guard(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def run(*args: Any) -> Any:
            try:
                return func()
            except Exception as exc:  # noqa: BLE001 - shown to the user, the viewer stays up
                log.exception("SegMoTE review: %s failed", getattr(func, "__name__", "action"))
                show_error(f"SegMoTE review: {exc}")
                self.status.value = f"error: {exc}"
                return None
        return run

    def _set_status(self, text: str) -> None:
        self.status.value = text
        log.info("%s", text)

    def _entry(self, case: str) -> QueueEntry:
        return next(e for e in self.entries if e.case == case)

    def _refresh_queue(self) -> None:
        self.queue.choices = []  # magicgui keeps kept items in place: reset to keep the order
        self.queue.choices = [describe(e) for e in self.entries]
        if self.case is not None:
            self.queue.value = describe(self._entry(self.case))

    # ------------------------------------------------------------------ actions
    def load(self, path: str | Path, corrections: str | Path | None = None
             ) -> list[QueueEntry]:
        """Open an output store and list its cases in review order with their status;
        ``corrections``: save to (and read from) this folder instead of
        ``<store>/corrections``."""
        store = open_output(Path(str(path)), corrections or None)
        store.open_cohort()  # fail now, saying where it looked, if the cohort has moved
        self.store = store
        self.entries = review_queue(store)
        self.slices = slice_queue(store)
        self._slice_pos = -1
        self.path.value = store.path
        self._refresh_queue()
        done = sum(e.reviewed for e in self.entries)
        self._set_status(f"{len(self.entries)} case(s), {done} reviewed; lowest QC first")
        return self.entries

    def _open_selected(self) -> None:
        line = _one(self.queue.value)
        if not line:
            raise ValueError("select a case in the list first")
        case = next(e.case for e in self.entries if describe(e) == line)
        self.open_case(case)

    def dirty(self) -> bool:
        """Whether the open case's labels differ from what was opened or last saved."""
        if self.case is None or COMMITTED not in self.viewer.layers:
            return False
        return not np.array_equal(np.asarray(self.viewer.layers[COMMITTED].data), self._baseline)

    def open_case(self, case: str, *, ask: bool = True) -> bool:
        """Show ``case`` (image, labels, worst slices); ``False`` when the user kept the open
        case because it has unsaved edits."""
        if self.store is None:
            raise ValueError("load an output store first")
        if ask and case != self.case and self.dirty() and not self.confirm(
                f"{self.case} has unsaved edits. Discard them and open {case}?"):
            return False
        layers = output_case_layers(self.store, case, labels_name=COMMITTED)
        for name in (COMMITTED, self.image_layer.name if self.image_layer is not None else None):
            if name is not None and name in self.viewer.layers:
                self.viewer.layers.remove(name)
        (img, img_kw, _), (lab, lab_kw, _) = layers
        self.image_layer = self.viewer.add_image(img, **img_kw)
        labels = self.viewer.add_labels(np.array(lab, copy=True), **lab_kw)
        self.viewer.reset_view()   # the new case fills the canvas, whatever the last one's size
        self._prelabel = np.asarray(self.store.prelabels(case)[...])
        self._baseline = np.array(labels.data, copy=True)
        self.case = case
        entry = self._entry(case)
        qc = self.store.qc(case)
        self.worst.choices = []
        self.worst.choices = [f"slice {z}: QC {qc[z]:.2f}" if z < len(qc) and
                              not math.isnan(qc[z]) else f"slice {z}" for z in entry.worst_slices]
        if entry.worst_slices:
            self.go_to_slice(entry.worst_slices[0])
        self.viewer.layers.selection.active = labels
        self._refresh_queue()
        source = lab_kw["metadata"]["segmote"]["labels_source"]
        qc_text = "-" if math.isnan(entry.qc) else f"{entry.qc:.2f}"
        self._set_status(f"case {case} (rank {entry.rank}, QC {qc_text}, {entry.status}): "
                         f"{source} shown; worst slices {entry.worst_slices or '-'}")
        return True

    def go_to_slice(self, z: int) -> None:
        layer = self.image_layer
        if layer is None or layer.ndim - int(bool(layer.rgb)) < 3:
            return
        axis = self.viewer.dims.ndim - layer.ndim
        self.viewer.dims.set_point(axis, layer.translate[0] + int(z) * layer.scale[0])

    def _go_to_selected_slice(self) -> None:
        chosen = _one(self.worst.value)
        if chosen:
            self.go_to_slice(int(chosen.split()[1].rstrip(":")))

    def save(self) -> Path:
        """Write the open case's labels to ``<out>/corrections/<case>`` (atomic)."""
        if self.store is None or self.case is None:
            raise ValueError("open a case first")
        data = np.asarray(self.viewer.layers[COMMITTED].data)
        edited = edited_slices(self._prelabel, data)
        path = save_correction(self.store, self.case, data, edited=edited)
        self._baseline = np.array(data, copy=True)
        self._entry(self.case).reviewed = True
        self._refresh_queue()
        show_info(f"SegMoTE: saved {self.case} ({len(edited)} edited slice(s))")
        self._set_status(f"saved {self.case} to {path} (edited slices: {edited or 'none'})")
        return path

    def next(self) -> str | None:
        """Open the next pending case after the open one (in queue order, wrapping)."""
        if not self.entries:
            raise ValueError("load an output store first")
        start = 0
        if self.case is not None:
            start = [e.case for e in self.entries].index(self.case) + 1
        order = self.entries[start:] + self.entries[:start]
        nxt = next((e.case for e in order if not e.reviewed and e.case != self.case), None)
        if nxt is None:
            self._set_status("every case is reviewed: export with segmote export")
            return None
        return nxt if self.open_case(nxt) else None

    def next_slice(self) -> SliceEntry | None:
        """Go to the next slice of the cohort's slice queue (lowest QC first) whose case is not
        reviewed, opening its case when it is another one (asking first if the open case has
        unsaved edits). The slice queue puts a reviewer's time where the error is: the worst
        slices of every case before the middling ones of any."""
        if not self.slices:
            raise ValueError("load an output store first")
        reviewed = {e.case for e in self.entries if e.reviewed}
        n = len(self.slices)
        for step in range(1, n + 1):
            pos = (self._slice_pos + step) % n
            entry = self.slices[pos]
            if entry.case not in reviewed:
                break
        else:
            self._set_status("every case is reviewed: export with segmote export")
            return None
        if entry.case != self.case and not self.open_case(entry.case):
            return None
        self._slice_pos = pos
        self.go_to_slice(entry.slice)
        qc_text = "nothing segmented" if math.isnan(entry.qc) else f"QC {entry.qc:.2f}"
        self._set_status(f"slice {entry.slice} of {entry.case} ({qc_text}; slice {entry.rank} "
                         f"of {n} in the cohort, lowest QC first)")
        return entry

    def annotate(self) -> Any:
        """Dock the SegMoTE annotator on the open case's image (its labels are adopted)."""
        if self.image_layer is None:
            raise ValueError("open a case first")
        _, widget = self.viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
        widget.image.value = self.image_layer
        if widget.controller.predictor is not None:
            widget.start()
            self._set_status(f"annotating {self.case}: points/boxes add objects, Refine uses "
                             "a pre-label object as mask prompt; paint/erase edit directly")
        else:
            self._set_status("load a model in the annotator, then press 'Start annotating'")
        return widget
