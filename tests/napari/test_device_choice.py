"""The plugin's device choice: auto = CUDA, then MPS, then the CPU; the model, its embeddings
and the embedding cache's signature follow the choice."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig
from segmote_core.build import build_sam
from segmote_core.device import available_devices, best_device

from napari_segmote._models import CHECKPOINT

pytestmark = pytest.mark.gui


def test_device_choices_and_auto_picks_the_best(make_napari_viewer, qtbot, tmp_path):
    torch.manual_seed(0)
    torch.save(build_sam(SegMoTEConfig(model_type="tiny")).state_dict(), tmp_path / "sam.pth")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    choices = tuple(widget.device.choices)
    assert choices == available_devices()
    assert choices[0] == "auto" and choices[-1] == "cpu"
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert choices == ("auto", "cpu")
    assert widget.device.value == "auto"
    widget.source.value = CHECKPOINT
    widget.sam_checkpoint.value = tmp_path / "sam.pth"
    widget.model_type.value = "tiny"
    widget.load_model()
    qtbot.waitUntil(lambda: widget._loader is None, timeout=120_000)
    model = widget.controller.model
    assert model is not None and model.device.type == best_device().type
    if best_device().type == "cpu":
        assert model.device.type == "cpu"
    assert f"on {model.device.type}" in widget.status.value
    pred = widget.controller.predictor
    assert pred.encoder_signature()["device"] == model.device.type
    assert pred.model_signature()["device"] == model.device.type
    # an explicit choice is honoured
    widget.device.value = "cpu"
    widget.load_model()
    qtbot.waitUntil(lambda: widget._loader is None, timeout=120_000)
    assert widget.controller.model.device.type == "cpu"


def test_load_choice_refuses_a_missing_device(tmp_path):
    from napari_segmote._models import load_choice

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    torch.save(build_sam(SegMoTEConfig(model_type="tiny")).state_dict(), tmp_path / "sam.pth")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_choice(CHECKPOINT, tmp_path / "sam.pth", None, "tiny", device="cuda")
