"""Helpers of the napari plugin tests: open the annotator, wait for its worker, move the slider."""

from __future__ import annotations

import numpy as np


def open_annotator(make_napari_viewer, model):
    """A viewer with the CT phantom and the dock widget annotating it with ``model``."""
    viewer = make_napari_viewer()
    viewer.open_sample("segmote", "ct_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    widget.controller.set_model(model)
    widget.image.value = viewer.layers["CT phantom"]
    widget.modality.value = "CT"
    widget.start()
    return viewer, widget


def wait_idle(qtbot, controller, timeout: int = 60_000) -> None:
    """Wait until the controller's worker (and its follow-ups) finished."""
    qtbot.waitUntil(lambda: controller.worker is None, timeout=timeout)


def go_to_slice(viewer, layer, z: int) -> None:
    viewer.dims.set_point(viewer.dims.ndim - layer.ndim, layer.translate[0] + z * layer.scale[0])


def bright_centre(labels: np.ndarray, label: int, z: int) -> tuple[float, float]:
    """(y, x) centre of ``label`` on slice ``z``."""
    ys, xs = np.nonzero(labels[z] == label)
    return float(ys.mean()), float(xs.mean())
