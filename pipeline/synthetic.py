"""A small synthetic cohort (bright ellipsoids in noise) to try, test and benchmark the
pipeline without patient data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["synthetic_volume", "synthetic_cohort"]


def synthetic_volume(rng: np.random.Generator, slices: int = 4, size: int = 64,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like ``(Z, Y, X)`` int16 volume with one ellipsoid and its uint8 mask."""
    z, y, x = np.mgrid[:slices, :size, :size].astype(np.float32)
    c = rng.uniform(0.35, 0.65, 3) * np.array([slices, size, size])
    r = rng.uniform(0.2, 0.3, 3) * np.array([max(slices, 2) * 2, size, size])
    mask = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
    image = np.where(mask, 60, -80) + rng.normal(0, 15, mask.shape)
    return image.astype(np.int16), mask.astype(np.uint8)


def synthetic_cohort(path: str | Path, n_cases: int = 5, slices: int = 4, size: int = 64,
                     seed: int = 0) -> list[str]:
    """Write ``n_cases`` CT cases ``case_000``... (with ground-truth ``labels``); returns ids."""
    from segmote_core.io import create_cohort, write_case

    rng = np.random.default_rng(seed)
    create_cohort(path)
    ids = []
    for i in range(n_cases):
        image, mask = synthetic_volume(rng, slices, size)
        case_id = f"case_{i:03d}"
        write_case(path, case_id, image, spacing=(2.0, 1.0, 1.0), modality="CT", labels=mask,
                   attrs={"dataset": "synthetic"})
        ids.append(case_id)
    return ids
