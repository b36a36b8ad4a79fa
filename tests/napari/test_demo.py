"""The bundled demo model in the plugin, on the plugin's own sample data (Dice checks).

Skipped only while the demo model has not been built into ``segmote_core/data/demo``.
"""

from __future__ import annotations

import numpy as np
import pytest

from segmote_core.build import demo_model_path
from segmote_core.sample_images import make_dermoscopy_phantom

from napari_segmote._models import DEMO
from napari_segmote.layers import BOXES, CURRENT

from tests.napari.helpers import wait_idle

pytestmark = [pytest.mark.gui, pytest.mark.skipif(
    not demo_model_path().is_file(), reason="the bundled demo model is not built yet")]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _open(make_napari_viewer, qtbot, sample: str, layer: str, modality: str):
    viewer = make_napari_viewer()
    viewer.open_sample("segmote", sample)
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    widget.source.value = DEMO
    widget.load_model()                                   # the real button path, in a worker
    qtbot.waitUntil(lambda: widget._loader is None, timeout=60_000)
    assert widget.controller.model is not None
    widget.image.value = viewer.layers[layer]
    widget.modality.value = modality
    widget.start()
    return viewer, widget


def _box(c, z: int | None, mask: np.ndarray, qtbot) -> None:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    corners = [[y0, x0], [y0, x1], [y1, x1], [y1, x0]]
    c.layers[BOXES].add_rectangles([[z, *p] for p in corners] if z is not None else corners)
    wait_idle(qtbot, c)


def test_demo_model_auto_on_dermoscopy_phantom(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot, "dermoscopy_phantom",
                           "Dermoscopy phantom", "DERM")
    c = widget.controller
    _, lesion = make_dermoscopy_phantom()
    widget.auto_slice_button.clicked.emit()
    wait_idle(qtbot, c)
    d_auto = dice(c.layers[CURRENT].data, lesion)
    widget.clear_button.clicked.emit()
    _box(c, None, lesion, qtbot)
    d_box = dice(c.layers[CURRENT].data, lesion)
    print(f"dermoscopy phantom: auto Dice {d_auto:.3f}, box Dice {d_box:.3f}")
    assert d_box >= 0.85 and d_auto >= 0.80
    assert "expert" in widget.status.value
