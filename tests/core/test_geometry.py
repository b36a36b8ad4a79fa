"""The one box/point-from-mask convention (segmote_core.geometry) and every caller of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from segment_anything.utils.amg import batched_mask_to_box

from pipeline.cases import boxes_from_labels
from segmote_core.geometry import expand_box, interior_point, mask_to_box, masks_to_boxes
from segmote_core.volume import prompt_from_mask
from training.prompts import mask_boxes


def _random_masks(n: int = 40, h: int = 23, w: int = 31, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), bool)
    for m in masks:
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] = True
        m &= rng.random((h, w)) < 0.9  # ragged edges, holes
    masks[3] = False  # one empty
    return masks


def test_box_convention_is_inclusive_max():
    m = np.zeros((10, 12), bool)
    m[2, 7] = True
    assert mask_to_box(m).tolist() == [7, 2, 7, 2]        # one pixel: x0 == x1, y0 == y1
    m[5, 3] = True
    assert mask_to_box(m).tolist() == [3, 2, 7, 5]
    full = np.ones((10, 12), bool)
    assert mask_to_box(full).tolist() == [0, 0, 11, 9]      # never past the last index
    assert mask_to_box(m).dtype == np.float32
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((4, 4), bool))


def test_boxes_equal_sams_own_mask_to_box():
    masks = _random_masks()
    ours = masks_to_boxes(masks, empty=0)
    sam = batched_mask_to_box(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(ours, sam)
    assert np.isnan(masks_to_boxes(masks)[3]).all()


def test_pipeline_boxes_follow_sams_box_semantics():
    """The pipeline's box mode used to add 1 to the maximum; it now gives the box SAM trained with."""
    masks = _random_masks(seed=1)
    labels = masks.astype(np.uint8) * 2
    labels[:, :2, :2] = 5
    boxes = boxes_from_labels(labels, label_id=2)
    sam = batched_mask_to_box(torch.from_numpy(labels == 2)).numpy().astype(np.float32)
    keep = (labels == 2).any((1, 2))
    np.testing.assert_array_equal(boxes[keep], sam[keep])
    assert np.isnan(boxes[~keep]).all()


def _old_training_mask_boxes(masks):
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    h, w = masks.shape[1:]
    y0 = np.where(rows.any(1), rows.argmax(1), 0)
    y1 = np.where(rows.any(1), h - 1 - rows[:, ::-1].argmax(1), 0)
    x0 = np.where(cols.any(1), cols.argmax(1), 0)
    x1 = np.where(cols.any(1), w - 1 - cols[:, ::-1].argmax(1), 0)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def _old_interior_point(mask):
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], np.float32)


def _old_volume_box(mask, margin):
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([max(xs.min() - margin, 0), max(ys.min() - margin, 0),
                     min(xs.max() + margin, w - 1), min(ys.max() + margin, h - 1)], np.float32)


def test_training_volume_and_evaluation_unchanged():
    masks = _random_masks(seed=2)
    np.testing.assert_array_equal(mask_boxes(masks), _old_training_mask_boxes(masks))
    for m in masks:
        if not m.any():
            assert prompt_from_mask(m) is None
            continue
        np.testing.assert_array_equal(interior_point(m), _old_interior_point(m))
        for margin in (0, 2, 50):
            p = prompt_from_mask(m, box_margin=margin)
            np.testing.assert_array_equal(p.box, _old_volume_box(m, margin))
            np.testing.assert_array_equal(p.points, _old_interior_point(m)[None])


def test_interior_point_is_farthest_from_background():
    ring = np.zeros((21, 21), bool)
    ring[5:16, 5:16] = True
    assert interior_point(ring).tolist() == [10, 10]
    edge = np.zeros((5, 9), bool)
    edge[:, :] = True                      # the image border counts as background
    assert interior_point(edge).tolist() == [2, 2]
    with pytest.raises(ValueError, match="empty"):
        interior_point(np.zeros((3, 3), bool))


def test_expand_box_clips_to_last_index():
    assert expand_box(np.array([1, 2, 5, 6]), 3, (8, 7)).tolist() == [0, 0, 6, 7]
