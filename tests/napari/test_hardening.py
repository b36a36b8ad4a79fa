"""The plugin with an untrained model: the Auto (PPT) buttons are off and say why."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig
from segmote_core.build import build_sam

from napari_segmote._models import CHECKPOINT, DEMO  # noqa: E402

pytestmark = pytest.mark.gui


def test_bare_sam_disables_auto_and_says_why(make_napari_viewer, qtbot, tmp_path):
    """Official SAM weights without SegMoTE weights ran PPT auto with random queries; the model
    list offered it. Now the Auto buttons are disabled, with the reason as their tooltip."""
    torch.manual_seed(0)
    torch.save(build_sam(SegMoTEConfig(model_type="tiny")).state_dict(), tmp_path / "sam.pth")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    widget.source.value = CHECKPOINT
    widget.sam_checkpoint.value = tmp_path / "sam.pth"
    widget.model_type.value = "tiny"
    widget.load_model()
    qtbot.waitUntil(lambda: widget._loader is None, timeout=120_000)
    assert widget.controller.model is not None and widget.controller.model.ppt is None
    for button in (widget.auto_slice_button, widget.auto_volume_button):
        assert not button.enabled
        assert "bare SAM" in button.tooltip and "--mode box" in button.tooltip
        assert "docs/training.md" in button.tooltip
    widget.source.value = DEMO                   # a trained model: Auto offered again
    widget.load_model()
    qtbot.waitUntil(lambda: widget._loader is None, timeout=120_000)
    assert widget.auto_slice_button.enabled and not widget.auto_slice_button.tooltip
