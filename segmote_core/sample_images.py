"""Sample images: small deterministic phantoms generated at call time (nothing stored or fetched).

:func:`make_ct_phantom` is a chest/abdomen-like CT volume in Hounsfield units with reference
labels, :func:`make_dermoscopy_phantom` an RGB skin-lesion image with its mask. The napari
plugin offers both as sample data; tests, benchmarks and scripts use them to annotate
something realistic without any download.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CT_CATEGORIES", "make_ct_phantom", "make_dermoscopy_phantom"]

#: Label ids of the CT phantom.
CT_CATEGORIES: dict[int, str] = {1: "lung_left", 2: "lung_right", 3: "liver", 4: "spine",
                                 5: "kidney"}


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: tuple[float, ...],
               radii: tuple[float, ...]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_ct_phantom(shape: tuple[int, int, int] = (24, 128, 128), seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A synthetic CT volume.

    Args:
        shape: ``(Z, Y, X)``.
        seed: noise seed (the geometry does not depend on it).

    Returns:
        ``(volume, labels, spacing)``: ``volume`` int16 HU ``(Z, Y, X)``, ``labels`` uint8 with
        the ids of :data:`CT_CATEGORIES`, ``spacing`` ``(z, y, x)`` in mm. The kidney (id 5,
        contrast-enhanced, bright) spans only the middle third of the slices.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (Z, Y, X) with every side >= 8, got {shape}")
    z_n, y_n, x_n = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, z_n), np.linspace(-1, 1, y_n),
                             np.linspace(-1, 1, x_n), indexing="ij")
    vol = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = _ellipsoid((yy, xx), (0.0, 0.0), (0.75, 0.9))
    vol[body] = -100.0                                     # subcutaneous fat
    body = _ellipsoid((yy, xx), (0.0, 0.0), (0.69, 0.84))
    vol[body] = 40.0                                       # soft tissue
    organs = {
        1: ((zz, yy, xx), (0.1, -0.15, -0.42), (1.3, 0.42, 0.28), -850.0),
        2: ((zz, yy, xx), (0.1, -0.15, 0.42), (1.3, 0.42, 0.28), -850.0),
        3: ((zz, yy, xx), (-0.6, 0.2, -0.3), (0.9, 0.35, 0.4), 90.0),
        4: ((yy, xx), (0.52, 0.0), (0.12, 0.12), 700.0),
        5: ((zz, yy, xx), (0.0, 0.25, 0.45), (0.35, 0.18, 0.14), 250.0),
    }
    for label, (grid, centre, radii, hu) in organs.items():
        inside = _ellipsoid(grid, centre, radii) & body
        vol[inside] = hu
        labels[inside] = label
    rng = np.random.default_rng(seed)
    vol += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return vol.round().astype(np.int16), labels, (2.5, 1.5, 1.5)


def make_dermoscopy_phantom(size: int = 192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic dermoscopy image ``(Y, X, 3)`` uint8 with a dark lesion, and its mask ``(Y, X)``.

    Like a dermatoscope's picture (and the demo model's training phantoms), the field of view
    is a bright disc that darkens to a black vignette in the corners.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    angle = np.arctan2(yy, xx)
    radius = 0.45 + 0.07 * np.sin(3 * angle) + 0.04 * np.cos(5 * angle)
    lesion = np.hypot(yy - 0.05, xx + 0.05) <= radius
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = (224.0, 182.0, 156.0)
    img[lesion] = (118.0, 72.0, 52.0)
    img *= np.clip(1.15 - (np.hypot(yy, xx) / 1.04) ** 4, 0.05, 1.0)[..., None]
    rng = np.random.default_rng(seed)
    img += rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), lesion.astype(np.uint8)
