"""Prompts derived from masks: the bounding box and the interior point of a binary mask.

Box convention (every caller in the package uses it): ``(x0, y0, x1, y1)`` in pixel indices with
the maximum **inclusive**, i.e. ``x1`` is the column of the right-most foreground pixel, not one
past it. A single foreground pixel at ``(y, x)`` has the box ``(x, y, x, y)``. This is the box SAM
was trained with (``segment_anything.utils.amg.batched_mask_to_box`` takes the max index), so a
box made here asks SAM for the object as its training taught it; the box is float32 so that it
goes straight into ``SamPredictor.predict(box=...)`` / ``ResizeLongestSide.apply_boxes``.

Point convention: ``(x, y)`` (column, row), float32, as SAM's point prompts.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["mask_to_box", "masks_to_boxes", "expand_box", "interior_point"]


def masks_to_boxes(masks: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """``(M, H, W)`` masks -> ``(M, 4)`` float32 inclusive XYXY boxes (module docstring).

    Args:
        masks: anything ``> 0`` / ``True`` is foreground.
        empty: the value of all four coordinates of a mask without foreground.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {masks.shape}")
    rows = masks.any(axis=2)  # (M, H)
    cols = masks.any(axis=1)  # (M, W)
    h, w = masks.shape[1:]
    boxes = np.stack([cols.argmax(1), rows.argmax(1),
                      w - 1 - cols[:, ::-1].argmax(1), h - 1 - rows[:, ::-1].argmax(1)],
                     axis=1).astype(np.float32)
    boxes[~rows.any(1)] = empty
    return boxes


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` mask -> ``(4,)`` float32 ``x0, y0, x1, y1`` with the maximum inclusive.

    Raises:
        ValueError: the mask has no foreground (there is no box to give).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("an empty mask has no bounding box")
    return masks_to_boxes(mask[None])[0]


def expand_box(box: np.ndarray, margin: float, shape: tuple[int, int]) -> np.ndarray:
    """An inclusive XYXY box widened by ``margin`` pixels on each side, clipped to an image of
    ``shape = (H, W)`` (so the maximum stays a valid pixel index)."""
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float32)
    h, w = shape
    return np.array([max(x0 - margin, 0), max(y0 - margin, 0),
                     min(x1 + margin, w - 1), min(y1 + margin, h - 1)], dtype=np.float32)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """``(x, y)`` float32 of the mask pixel farthest from the background (ties: first in raster
    order). Pixels outside the image count as background, so the point stays off the border.

    Raises:
        ValueError: the mask has no foreground.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("an empty mask has no interior point")
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], np.float32)
