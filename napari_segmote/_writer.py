"""npe2 writer: a Labels layer to NIfTI (with the source image's affine) or to zarr."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from segmote_core.io.readers import open_image
from segmote_core.io.writers import write_labels as core_write_labels

__all__ = ["write_labels", "labels_affine"]

log = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii", ".zarr")


def labels_affine(meta: dict[str, Any], ndim: int) -> np.ndarray:
    """The ``(4, 4)`` voxel ``(z, y, x)`` -> world affine of a layer.

    From ``metadata["segmote"]["affine"]`` (set by the reader from the source file), else a
    diagonal from the layer's scale and translate.
    """
    seg = (meta.get("metadata") or {}).get("segmote", {})
    if seg.get("affine") is not None:
        aff = np.asarray(seg["affine"], dtype=float)
        if aff.shape != (4, 4):
            raise ValueError(f"layer metadata holds an affine of shape {aff.shape}, not (4, 4)")
        return aff
    aff = np.eye(4)
    scale = list(meta.get("scale") or [1.0] * ndim)[-3:]
    translate = list(meta.get("translate") or [0.0] * ndim)[-3:]
    for i, (s, t) in enumerate(zip(scale, translate)):
        aff[i, i], aff[i, 3] = s, t
    return aff


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save one Labels layer; returns the written path (napari's single-layer writer API).

    Args:
        path: ``*.nii.gz``, ``*.nii`` or ``*.zarr``.
        data: ``(Z, Y, X)`` or ``(Y, X)`` integer labels.
        meta: the layer attributes napari passes (``metadata``, ``scale``, ``translate``, ...).
    """
    if not str(path).endswith(SUFFIXES):
        raise ValueError(f"{path}: SegMoTE writes labels as one of {SUFFIXES}")
    labels = np.asarray(data)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{path}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16
                           if labels.max(initial=0) < 65536 else np.int32)
    affine = labels_affine(meta, labels.ndim)
    seg = (meta.get("metadata") or {}).get("segmote", {})
    spacing = tuple(float(s) for s in (meta.get("scale") or [1.0] * labels.ndim))
    like = None
    source = Path(str(seg.get("source", "")))
    if source.name.endswith((".nii", ".nii.gz")) and source.is_file():
        like = open_image(source)  # its NIfTI header codes travel to the labels
        if like.shape[: labels.ndim] != labels.shape:
            like = None
    out = core_write_labels(labels, path, like, affine=affine, spacing=spacing,
                            modality=seg.get("modality"))
    log.info("wrote labels %s to %s", labels.shape, path)
    return [str(out if out is not None else Path(path))]
