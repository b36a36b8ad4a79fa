"""3D propagation and its stopping rule, checked with a stand-in whose masks are known; then the
same code path on the real predictor and the embedding cache; slice-wise PPT over a lazy volume."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from segmote_core.cache import EmbeddingCache
from segmote_core.inference import segment_batch
from segmote_core.io import open_image, write_labels
from segmote_core.progress import CancelToken, Cancelled
from segmote_core.volume import (PredictorSegmenter, PropagationConfig, SlicePrompt,
                                 SliceSegmentation,
                                 StopEvent, prompt_from_mask, propagate, segment_volume_auto)

from tests.io.volumes import EncoderCalls, ct_volume, ellipsoid

Z, Y, X = 20, 48, 56


class KnownSegmenter:
    """Returns the ground-truth objects that the prompt's box (or point) touches on slice z.

    ``jump``: when the box touches nothing, return another object of the slice instead (a model
    that wanders to a neighbouring structure). ``leak_at``: slices where the whole image comes back.
    """

    def __init__(self, truth: np.ndarray, jump: bool = False, leak_at: tuple[int, ...] = ()):
        self.truth, self.jump, self.leak_at = truth, jump, leak_at
        self.n_slices, self.shape = truth.shape[0], truth.shape[1:]
        self.calls: list[tuple[int, SlicePrompt]] = []

    def segment(self, z: int, prompt: SlicePrompt) -> SliceSegmentation:
        self.calls.append((z, prompt))
        lab = self.truth[z]
        if z in self.leak_at:
            return SliceSegmentation(np.ones(lab.shape, bool), 0.9)
        region = np.zeros(lab.shape, bool)
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box.astype(int)
            region[y0:y1 + 1, x0:x1 + 1] = True
        if prompt.points is not None:
            for x, y in prompt.points.astype(int):
                region[y, x] = True
        ids = [i for i in np.unique(lab[region]) if i > 0]
        if not ids and self.jump:
            ids = [i for i in np.unique(lab) if i > 0][:1]
        return SliceSegmentation(np.isin(lab, ids), 0.9)


def two_objects() -> np.ndarray:
    """Object 1: slices 4..13 on the left; object 2: slices 14..17, on the right (no overlap)."""
    truth = np.zeros((Z, Y, X), np.uint8)
    truth[ellipsoid((Z, Y, X), (8.5, 24, 18), (5.4, 12, 10))] = 1
    truth[ellipsoid((Z, Y, X), (15.5, 24, 44), (2.4, 8, 8))] = 2
    assert sorted(np.flatnonzero(truth.reshape(Z, -1).max(1) == 1)) == list(range(4, 14))
    return truth


def box_prompt(mask: np.ndarray) -> SlicePrompt:
    ys, xs = np.nonzero(mask)
    return SlicePrompt(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32))


def test_propagates_both_ways_and_stops_where_the_object_ends():
    truth = two_objects()
    seg = KnownSegmenter(truth)
    res = propagate(seg, {8: box_prompt(truth[8] == 1)})
    assert res.slices == list(range(4, 14))
    np.testing.assert_array_equal(res.mask, truth == 1)
    assert [z for z, _ in seg.calls] == [8, 7, 6, 5, 4, 3, 9, 10, 11, 12, 13, 14]
    assert res.stops == [StopEvent(8, -1, 3, "empty"), StopEvent(8, 1, 14, "empty")]
    assert set(res.source[4:14]) == {8} and (res.source[:4] == -1).all()
    assert np.isnan(res.scores[3]) and res.scores[9] == pytest.approx(0.9)
    # the prompt of slice 9 comes from the mask of slice 8: its box widened by 2 px + a point
    ys, xs = np.nonzero(truth[8] == 1)
    p9 = dict(seg.calls)[9]
    np.testing.assert_array_equal(p9.box, [xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2])
    (px, py), = p9.points.astype(int)
    assert truth[8, py, px] == 1 and p9.labels.tolist() == [1]
    assert abs(px - 18) <= 1 and abs(py - 24) <= 1          # the innermost pixel: the centre
    p5 = dict(seg.calls)[5]                                   # downwards from slice 6's mask
    ys, xs = np.nonzero(truth[6] == 1)
    np.testing.assert_array_equal(p5.box, [xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2])


def test_a_jump_to_another_structure_stops_propagation():
    truth = two_objects()
    seg = KnownSegmenter(truth, jump=True)
    res = propagate(seg, {8: box_prompt(truth[8] == 1)})
    assert res.slices == list(range(4, 14))              # object 2 on slice 14 is not taken
    assert StopEvent(8, 1, 14, "no_overlap") in res.stops
    assert res.mask[14:].sum() == 0


def test_leak_and_score_and_distance_limits():
    truth = two_objects()
    res = propagate(KnownSegmenter(truth, leak_at=(11,)), {8: box_prompt(truth[8] == 1)})
    assert res.slices == list(range(4, 11)) and StopEvent(8, 1, 11, "leak") in res.stops
    res = propagate(KnownSegmenter(truth), {8: box_prompt(truth[8] == 1)},
                    PropagationConfig(max_slices=2))
    assert res.slices == [6, 7, 8, 9, 10]
    assert {s.reason for s in res.stops} == {"max_slices"}
    res = propagate(KnownSegmenter(truth), {8: box_prompt(truth[8] == 1)},
                    PropagationConfig(min_score=0.95))
    assert res.slices == [8] and {s.reason for s in res.stops} == {"low_score"}


def test_several_prompted_slices_split_the_gap_and_never_redo_a_slice():
    truth = two_objects()
    seg = KnownSegmenter(truth)
    res = propagate(seg, {5: box_prompt(truth[5] == 1), 12: box_prompt(truth[12] == 1)})
    np.testing.assert_array_equal(res.mask, truth == 1)
    visited = [z for z, _ in seg.calls]
    assert sorted(visited) == sorted(set(visited))        # each slice asked once
    assert res.source[6:9].tolist() == [5, 5, 5] and res.source[9:12].tolist() == [12, 12, 12]
    assert StopEvent(5, 1, 9, "met") in res.stops and StopEvent(12, -1, 8, "met") in res.stops
    assert StopEvent(5, -1, 3, "empty") in res.stops and StopEvent(12, 1, 14, "empty") in res.stops


def test_object_at_the_volume_edge_and_empty_prompt_result():
    truth = np.zeros((6, 20, 20), np.uint8)
    truth[:3, 5:12, 5:12] = 1
    res = propagate(KnownSegmenter(truth), {1: box_prompt(truth[1] == 1)})
    assert res.slices == [0, 1, 2]
    assert res.stops == [StopEvent(1, -1, -1, "edge"), StopEvent(1, 1, 3, "empty")]
    seg = KnownSegmenter(truth)
    res = propagate(seg, {4: SlicePrompt(box=np.array([5, 5, 11, 11.]))})
    assert res.slices == [] and len(seg.calls) == 1
    with pytest.raises(ValueError, match="outside the volume"):
        propagate(seg, {6: SlicePrompt(box=np.array([1, 1, 2, 2.]))})
    with pytest.raises(ValueError, match="at least one"):
        propagate(seg, {})


def test_progress_and_cancel():
    truth = two_objects()
    token, seen = CancelToken(), []

    def progress(done, total):
        seen.append((done, total))
        if done == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        propagate(KnownSegmenter(truth), {8: box_prompt(truth[8] == 1)}, progress=progress,
                  cancel=token)
    assert seen == [(1, Z), (2, Z), (3, Z)]


def test_prompt_from_mask_clips_and_handles_empty():
    m = np.zeros((10, 12), bool)
    m[0:3, 9:12] = True
    p = prompt_from_mask(m, box_margin=2)
    np.testing.assert_array_equal(p.box, [7, 0, 11, 4])
    assert m[int(p.points[0, 1]), int(p.points[0, 0])]
    assert prompt_from_mask(np.zeros((4, 4), bool)) is None


def test_real_predictor_propagation_reuses_the_cache(tmp_path, tiny_model_128, predictor):
    vol, obj = ct_volume((5, 32, 40))
    box = box_prompt(obj[2]).box
    cache = EmbeddingCache.for_volume(tmp_path / "emb.zarr", predictor, vol, modality="CT")
    calls = EncoderCalls(tiny_model_128)
    try:
        cfg = PropagationConfig(min_area=1, min_overlap=0.0, max_area_ratio=None)
        first = propagate(PredictorSegmenter(predictor, vol, "CT", cache=cache),
                          {2: SlicePrompt(box=box)}, cfg)
        encoded = calls.images
        assert encoded == len({*first.prompts}) and cache.done_slices() == sorted(first.prompts)
        second = propagate(PredictorSegmenter(predictor, vol, "CT", cache=cache),
                           {2: SlicePrompt(box=box)}, cfg)
        assert calls.images == encoded                      # every slice came from the cache
    finally:
        calls.close()
    np.testing.assert_array_equal(first.mask, second.mask)
    predictor.set_image(vol[2], modality="CT")     # the cache keeps half precision
    direct = predictor.predict(box=box).masks[0]
    assert 2 * (first.mask[2] & direct).sum() / (first.mask[2].sum() + direct.sum()) >= 0.98
    assert first.mask.shape == vol.shape


def test_auto_segmentation_of_a_lazy_volume_matches_the_batch_path(tmp_path, tiny_model_128):
    vol, _ = ct_volume((5, 32, 36))
    write_labels(vol.astype(np.uint16), tmp_path / "v.zarr", modality="CT")   # any zarr volume
    img = open_image(tmp_path / "v.zarr")
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=vol.shape, dtype=np.uint8,
                          chunks=(1, 32, 36))
    seen = []
    res = segment_volume_auto(tiny_model_128, img, "MR", chunk=2, out=out, precision="fp32",
                              progress=lambda d, t: seen.append(d))
    ref = segment_batch(tiny_model_128, vol.astype(np.uint16), "MR", chunk=5, precision="fp32")
    np.testing.assert_array_equal(out[...], ref.masks.astype(np.uint8))
    np.testing.assert_allclose(res.confidence, ref.confidence, atol=1e-5)
    np.testing.assert_array_equal(res.expert, ref.expert)
    assert seen == [2, 4, 5]
