"""The QC score: its parts on hand-made masks, and a planted bad slice ranked first by the real
demo model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmote_core import qc as QC


def test_combine_is_a_weighted_geometric_mean_of_present_components():
    comps = {"stability": [0.9, 0.5, np.nan], "reprompt": [0.9, np.nan, np.nan],
             "iou_head": [0.1, 0.1, np.nan]}
    w = {"stability": 3.0, "reprompt": 1.0, "iou_head": 0.0}
    got = QC.combine(comps, w)
    assert got[0] == pytest.approx(0.9)
    assert got[1] == pytest.approx(0.5)  # only stability present
    assert math.isnan(got[2])            # nothing to rate
    # one bad component pulls the score down more than an arithmetic mean would
    bad = QC.combine({"stability": [0.05], "reprompt": [1.0]}, {"stability": 1, "reprompt": 1})
    assert bad[0] == pytest.approx(math.sqrt(0.05)) and bad[0] < 0.525


def test_volume_signals_find_the_slice_that_lost_half_its_mask():
    masks = np.zeros((7, 20, 20), bool)
    masks[:, 4:16, 4:16] = True
    masks[3, 4:10] = False      # half of slice 3 missing
    masks[6] = False            # nothing on the last slice
    area = masks.reshape(7, -1).sum(1)
    got = QC.volume_signals(lambda z: masks[z], 7, area)
    assert np.argmin(np.nan_to_num(got["neighbours"], nan=9)) == 3
    assert got["area"][3] == pytest.approx(72 / 144)
    assert got["area"][0] == pytest.approx(1.0) and got["neighbours"][0] == pytest.approx(1.0)
    assert math.isnan(got["neighbours"][6]) and math.isnan(got["area"][6])
    single = QC.volume_signals(lambda z: masks[z], 1, area[:1])
    assert math.isnan(single["neighbours"][0])


def test_case_qc_worst_slices_and_json():
    assert QC.case_qc([0.9, 0.8, None, 0.1, float("nan"), 0.7]) == pytest.approx(0.1)
    assert QC.case_qc([0.5, 0.7, 0.9, 0.6, 0.8, 0.4, 1.0, 0.95]) == pytest.approx(0.45)
    assert math.isnan(QC.case_qc([None, float("nan")]))
    assert QC.worst_slices([0.9, None, 0.2, 0.5], k=2) == [2, 3]
    assert QC.as_json_list([0.123456, float("nan")]) == [0.1235, None]


def test_segment_with_qc_returns_segment_batch_masks(tiny_model_256, rng):
    from segmote_core.inference import segment_batch

    slices = rng.normal(0, 300, (3, 48, 40)).astype(np.int16)
    slices[:, 10:30, 10:30] += 400
    ref = segment_batch(tiny_model_256, slices, "CT", chunk=2)
    res, sig = QC.segment_with_qc(tiny_model_256, slices, "CT", chunk=2)
    np.testing.assert_array_equal(res.masks, ref.masks)
    np.testing.assert_allclose(res.confidence, ref.confidence, atol=1e-6)
    assert np.array_equal(sig.area, res.masks.reshape(3, -1).sum(1))
    for name in ("iou_head", "stability", "reprompt"):
        v = getattr(sig, name)
        present = sig.area > 0
        assert np.all(np.isnan(v[~present]))
        assert np.all((v[present] >= 0) & (v[present] <= 1))
    boxes = np.array([[10, 10, 30, 30], [np.nan] * 4, [5, 5, 20, 25]], np.float32)
    res_b, sig_b = QC.segment_with_qc(tiny_model_256, slices, "CT", boxes=boxes)
    ref_b = segment_batch(tiny_model_256, slices, "CT", boxes=boxes)
    np.testing.assert_array_equal(res_b.masks, ref_b.masks)
    assert not res_b.masks[1].any() and math.isnan(sig_b.stability[1])
    assert np.all(np.isnan(sig_b.reprompt))  # a box prompt is not re-asked by its own box


@pytest.fixture(scope="module")
def brain_block():
    """Eight consecutive slices from the middle of a demo brain the demo model never saw."""
    from training.phantoms_brain import brain_patient, load_mni_template

    p = brain_patient(load_mni_template(), np.random.default_rng([3, 0, 0]))
    mid = len(p.image) // 2
    return p.image[mid - 4:mid + 4].copy(), p.labels[mid - 4:mid + 4] > 0


# One occluder in the default run, the other in the slow run (CI runs both): each takes ~30 s
# with the default demo model, whose encoder costs ~2 s a slice on a CPU.
@pytest.mark.parametrize("fill", [pytest.param("dark", marks=pytest.mark.slow), "bright"])
def test_demo_model_qc_ranks_an_occluded_slice_first(brain_block, fill):
    from segmote_core import load_demo_model

    image, truth = brain_block
    bad = 4
    ys, _ = np.nonzero(truth[bad])
    image = image.copy()
    # a lead marker / dropout band over the top half of the brain on one slice
    image[bad, ys.min():(ys.min() + ys.max()) // 2] = 0 if fill == "dark" else image.max()
    res, sig = QC.segment_with_qc(load_demo_model(), image, "MR_T1W")
    qc, comps = QC.slice_qc(sig, lambda z: res.masks[z])
    dice = [2 * (t & m).sum() / (t.sum() + m.sum()) for t, m in zip(truth, res.masks)]
    assert int(np.argmin(dice)) == bad  # the planted slice is the bad one ...
    assert QC.worst_slices(qc, 1) == [bad]  # ... and QC puts it first
    assert qc[bad] < min(np.delete(qc, bad)) - 0.03
    assert set(comps) == set(QC.COMPONENTS)
