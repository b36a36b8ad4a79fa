"""A tiny labelled cohort written to disk for the training tests (the cohort layout of docs/medical_io.md).

Two datasets: ``discs`` (MR volumes, 3 patients, categories ``rim`` (1) and ``core`` (2) with
the union ``disc`` as ``auto_category``) and ``spots`` (2D RGB dermoscopy-like images, one
category ``lesion``, PPT-eligible).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def _disc_volume(rng: np.random.Generator, z: int = 6, size: int = 64):
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((z, size, size), np.float32)
    labels = np.zeros((z, size, size), np.uint8)
    cy, cx = rng.uniform(24, 40, 2)
    for k in range(z):
        r = 10 + 8 * np.sin(np.pi * (k + 0.5) / z)
        d = np.hypot(yy - cy, xx - cx)
        labels[k][d < r] = 1
        labels[k][d < r * 0.55] = 2
        image[k] = 100 + 300 * (labels[k] == 1) + 600 * (labels[k] == 2)
        image[k] += rng.normal(0, 20, (size, size))
    return image, labels


def _spot_image(rng: np.random.Generator, size: int = 48):
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(16, 32, 2)
    r = rng.uniform(6, 11)
    lesion = np.hypot(yy - cy, xx - cx) < r
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[...] = (200, 170, 150)
    rgb[lesion] = (90, 60, 40)
    noise = rng.integers(-10, 10, rgb.shape)
    return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8), lesion.astype(np.uint8)


def write_tiny_cohort(path: Path, seed: int = 0) -> Path:
    """Write the two-dataset cohort to ``path``; returns it."""
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w")
    root.attrs["segmote"] = {"kind": "cohort", "version": 1}
    for i in range(3):
        image, labels = _disc_volume(rng)
        g = root.create_group(f"disc_{i:02d}")
        g.attrs.update({"dataset": "discs", "categories": {"1": "rim", "2": "core"},
                        "auto_category": "disc", "patient": f"p{i}"})
        a = g.create_array("image", shape=image.shape, dtype=image.dtype,
                           chunks=(1, *image.shape[1:]))
        a[...] = image
        a.attrs.update({"modality": "MR", "spacing": [2.0, 1.0, 1.0]})
        lab = g.create_array("labels", shape=labels.shape, dtype=labels.dtype,
                             chunks=(1, *labels.shape[1:]))
        lab[...] = labels
    for i in range(4):
        rgb, lesion = _spot_image(rng)
        g = root.create_group(f"spot_{i:02d}")
        g.attrs.update({"dataset": "spots", "categories": {"1": "lesion"},
                        "auto_category": "lesion", "patient": f"s{i}"})
        a = g.create_array("image", shape=rgb.shape, dtype=rgb.dtype, chunks=rgb.shape)
        a[...] = rgb
        a.attrs.update({"modality": "DERM", "spacing": [1.0, 1.0]})
        lab = g.create_array("labels", shape=lesion.shape, dtype=lesion.dtype,
                             chunks=lesion.shape)
        lab[...] = lesion
    return path
