"""Per-slice quality measures of the curation (MedSeg-HQ style, docs/curation.md).

A slice is scored on its image, normalised with its *case's* robust intensity range (so a dark
or blank slice of a volume stays dark/blank instead of being stretched), and on its label:

| measure | definition |
| --- | --- |
| ``clarity`` | variance of the 3x3 Laplacian of the normalised slice (sharpness) minus the part noise explains (20 x noise sigma^2), floored at 0 |
| ``contrast`` | RMS contrast: standard deviation of the normalised slice |
| ``label_contrast`` | max over categories of abs(mean(inside) - mean(ring around it)) / slice std; the ring is 4 % of the slice side wide |
| ``entropy`` | Shannon entropy (bits) of a 64-bin histogram of the normalised slice |
| ``noise`` | noise sigma (Immerkaer's operator, robust median form) / slice std (~1 = pure noise) |
| ``fg_ratio`` / ``fg_pixels`` | fraction / count of pixels with a label id > 0 |
| ``regions`` | 8-connected components of the foreground (label > 0) |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SliceScores", "case_intensity_range", "to_grey", "score_slice"]

_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
_EIGHT = np.ones((3, 3), bool)
_LAPLACE_GAIN = 20.0      # var(Laplacian of white noise) / noise variance, 3x3 kernel


@dataclass(frozen=True)
class SliceScores:
    """The raw measures of one slice (see the module table)."""

    clarity: float
    contrast: float
    label_contrast: float
    entropy: float
    noise: float
    fg_ratio: float
    fg_pixels: int
    regions: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def to_grey(image: np.ndarray) -> np.ndarray:
    """(Y, X) or (Y, X, 3) -> (Y, X) float64 (RGB via ITU-R 601 luma); NaN/inf -> 0."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if image.ndim != 2:
        raise ValueError(f"expected a (Y, X) or (Y, X, 3) slice, got shape {image.shape}")
    out = image.astype(np.float64)
    out[~np.isfinite(out)] = 0.0
    return out


def case_intensity_range(slices: list[np.ndarray]) -> tuple[float, float]:
    """Robust intensity range of one case: the medians, over sample slices, of each slice's
    0.5th and 99.5th percentiles (a few blank or noisy slices do not move it)."""
    if not slices:
        raise ValueError("case_intensity_range needs at least one slice")
    pct = np.array([np.percentile(to_grey(s), [0.5, 99.5]) for s in slices])
    lo, hi = np.median(pct, axis=0)
    return float(lo), float(hi)


def score_slice(image: np.ndarray, labels: np.ndarray, value_range: tuple[float, float]) -> SliceScores:
    """Measure one slice.

    Args:
        image: (Y, X) or (Y, X, 3) slice, any numeric dtype.
        labels: (Y, X) integer ids (0 = background).
        value_range: the case's (low, high) from :func:`case_intensity_range`.
    Returns:
        :class:`SliceScores`.
    """
    grey = to_grey(image)
    labels = np.asarray(labels)
    if labels.shape != grey.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the slice shape {grey.shape}")
    lo, hi = value_range
    norm = np.clip((grey - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(grey)
    std = float(norm.std())
    laplace_var = float(ndimage.laplace(norm).var())
    hist = np.histogram(norm, bins=64, range=(0.0, 1.0))[0].astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    entropy = float(-(p * np.log2(p)).sum())
    h, w = norm.shape
    if std > 1e-6 and h > 2 and w > 2:
        conv = ndimage.convolve(norm, _IMMERKAER, mode="nearest")[1:-1, 1:-1]
        sigma = float(np.median(np.abs(conv))) / (0.6745 * 6.0)  # robust to edges and lines
        noise = float(min(sigma / std, 5.0))
    else:
        sigma, noise = 0.0, 0.0
    clarity = max(laplace_var - _LAPLACE_GAIN * sigma ** 2, 0.0)
    fg = labels > 0
    fg_pixels = int(fg.sum())
    label_contrast = 0.0
    if 0 < fg_pixels < fg.size and std > 1e-6:
        ring = max(3, int(round(0.04 * max(h, w))))
        for lid in np.unique(labels[fg]):
            inside = labels == lid
            around = ndimage.binary_dilation(inside, iterations=ring) & ~inside
            if around.any():
                diff = abs(float(norm[inside].mean()) - float(norm[around].mean()))
                label_contrast = max(label_contrast, diff / std)
    regions = int(ndimage.label(fg, structure=_EIGHT)[1]) if fg_pixels else 0
    return SliceScores(clarity=clarity, contrast=std, label_contrast=label_contrast,
                       entropy=entropy, noise=noise, fg_ratio=fg_pixels / fg.size,
                       fg_pixels=fg_pixels, regions=regions)
