"""Prompts of one slice from annotation data held in image index order (pure array functions).

A viewer holds prompts in the image's data coordinates: points ``(N, D)`` with a boolean
``positive`` flag each, rectangles as ``(4, D)`` vertex arrays (napari's Points and Shapes
``data``); ``D`` is 3 ``(z, y, x)`` for volumes and 2 ``(y, x)`` for 2D and RGB images. The
model wants XY pixels and XYXY boxes: these helpers convert, slice by slice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["points_on_slice", "box_on_slice", "object_mask", "prompted_slices"]


def _on_slice(z_coords: np.ndarray, z: int) -> np.ndarray:
    return np.round(np.asarray(z_coords, dtype=float)).astype(int) == int(z)


def points_on_slice(data: np.ndarray, positive: Sequence[bool] | np.ndarray, z: int | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Points of slice ``z`` as ``(coords (P, 2) XY, labels (P,) 1/0)``.

    Args:
        data: ``(N, 3)`` z, y, x or ``(N, 2)`` y, x (then ``z`` is ignored).
        positive: ``(N,)`` True for foreground points.
        z: slice index for volumes, ``None`` for 2D.
    """
    data = np.asarray(data, dtype=np.float32).reshape(-1, np.shape(data)[-1] if len(data) else 2)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if len(positive) != len(data):
        raise ValueError(f"{len(data)} points but {len(positive)} positive flags")
    if data.shape[1] == 3:
        if z is None:
            raise ValueError("3D points need a slice index")
        keep = _on_slice(data[:, 0], z)
        data, positive = data[keep, 1:], positive[keep]
    elif data.shape[1] != 2:
        raise ValueError(f"points must have 2 or 3 coordinates, got {data.shape[1]}")
    return data[:, ::-1].copy(), positive.astype(np.int64)


def box_on_slice(shapes: Sequence[np.ndarray], z: int | None,
                 shape_types: Sequence[str] | None = None) -> np.ndarray | None:
    """The last rectangle of slice ``z`` as XYXY (clipped to nothing; pixels), or ``None``.

    Args:
        shapes: list of ``(V, 3)`` or ``(V, 2)`` vertex arrays (napari Shapes ``data``).
        shape_types: napari ``shape_type`` per shape; only rectangles are used when given.
    """
    for i in range(len(shapes) - 1, -1, -1):
        if shape_types is not None and shape_types[i] != "rectangle":
            continue
        v = np.asarray(shapes[i], dtype=np.float32)
        if v.shape[1] == 3:
            if z is None:
                raise ValueError("3D shapes need a slice index")
            if not _on_slice(v[:, 0], z).all():
                continue
            v = v[:, 1:]
        (y0, x0), (y1, x1) = v.min(axis=0), v.max(axis=0)
        return np.array([x0, y0, x1, y1], dtype=np.float32)
    return None


def object_mask(labels: np.ndarray, object_id: int, z: int | None) -> np.ndarray:
    """Binary ``(Y, X)`` mask of ``object_id`` in slice ``z`` of a label image.

    Raises ``ValueError`` when the object is absent from that slice.
    """
    plane = np.asarray(labels[z] if z is not None and np.ndim(labels) == 3 else labels)
    mask = plane == int(object_id)
    if not mask.any():
        where = f"slice {z}" if z is not None else "the image"
        raise ValueError(f"object {object_id} is not present in {where} of the labels layer")
    return mask


def prompted_slices(points: np.ndarray, shapes: Sequence[np.ndarray]) -> list[int]:
    """Sorted slice indices holding a point or a shape (3D layer data only)."""
    zs = set()
    pts = np.asarray(points)
    if pts.ndim == 2 and pts.shape[1] == 3 and len(pts):
        zs.update(int(z) for z in np.round(pts[:, 0]))
    for v in shapes:
        v = np.asarray(v)
        if v.shape[1] == 3:
            zs.add(int(np.round(v[0, 0])))
    return sorted(zs)
