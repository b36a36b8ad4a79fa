"""The Review panel's "Improve the model from reviewed cases": a thread worker with progress and
Cancel (a cancelled run leaves no new model and resumes on the next click), before/after
validation Dice shown, and the new model offered to the annotator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.store import OutputStore
from segmote_core.build import load_demo_model
from segmote_core.finetune import FineTuneConfig
from segmote_core.io import create_cohort, write_case
from segmote_core.predictor import model_signature
from segmote_core.review import save_correction

pytestmark = pytest.mark.gui

FAST = FineTuneConfig(steps=4, batch_size=2, eval_every=2, checkpoint_every=1)


@pytest.fixture
def reviewed(tmp_path):
    """Three disc volumes pre-labelled (a wrong square) and corrected to the true disc."""
    cohort = tmp_path / "cohort.zarr"
    create_cohort(cohort)
    yy, xx = np.mgrid[:48, :48]
    truth = {}
    for i in range(3):
        disc = (np.hypot(yy - 22 - 2 * i, xx - 25) < 11 + i).astype(np.uint8)
        lab = np.stack([disc] * 3)
        img = 100.0 + 700.0 * lab + np.random.default_rng(i).normal(0, 20, lab.shape)
        write_case(cohort, f"disc_{i}", img.astype(np.float32), spacing=(3.0, 1.0, 1.0),
                   modality="MR")
        truth[f"disc_{i}"] = lab
    out = tmp_path / "labels.zarr"
    with OutputStore(out, cohort, {"model": model_signature(load_demo_model())}) as st:
        for case, lab in truth.items():
            pre = np.zeros_like(lab)
            pre[:, 5:20, 5:20] = 1
            st.begin(case, pre.shape)
            st.write(case, 0, pre)
            st.finish(case, np.full(3, 0.3), np.zeros(3, np.int16), {"qc": [0.5] * 3})
    for case, lab in truth.items():
        save_correction(out, case, lab)
    return out


def test_improve_cancel_resume_and_use(make_napari_viewer, reviewed, qtbot):
    viewer = make_napari_viewer()
    _, review = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE review")
    review.load(reviewed)
    panel = review.improve
    target = reviewed.with_name("labels.zarr.models") / "improved-1.safetensors"

    panel.improve(FAST)
    panel.cancel()                                              # at once: stops early
    qtbot.waitUntil(lambda: panel.worker is None, timeout=300_000)
    assert not target.exists() and panel.model_path is None     # the old model stays
    assert "cancelled" in panel.result_label.value
    assert not panel.use_button.enabled

    panel.improve(FAST)                                         # resumes (or starts) the run
    qtbot.waitUntil(lambda: panel.worker is None, timeout=300_000)
    assert panel.model_path == target and target.is_file()
    assert not target.with_suffix(".finetune_state.pt").exists()
    lineage = json.loads(target.with_suffix(".json").read_text())["training"]["lineage"]
    assert lineage["steps"] == FAST.steps
    before, after = lineage["val_dice_before"], lineage["val_dice_after"]
    assert after >= before
    assert f"{before:.3f} -> {after:.3f}" in panel.result_label.value
    assert panel.use_button.enabled

    widget = panel.use_model()                                  # offered to the annotator
    qtbot.waitUntil(lambda: widget._loader is None, timeout=120_000)
    from segmote_core.build import load_segmote

    got = model_signature(widget.controller.predictor.model)["weights_sha256"]
    assert got == model_signature(load_segmote(target))["weights_sha256"]
