"""Generated 2D phantoms of the demo cohort: chest X-rays with two lung fields and dermoscopy-like
RGB skin lesions, plus the shape and texture helpers the CT phantom (:mod:`training.phantoms_ct`)
shares. Every function draws all its randomness from the ``rng`` it is given.

Arrays are ``(Y, X)`` (grey) or ``(Y, X, 3)`` (RGB); centres and radii are in pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["blob", "smooth_noise", "xray_chest", "skin_lesion"]


def smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean, unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def blob(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float],
         rng: np.random.Generator, *, angle: float = 0.0, wobble: float = 0.08,
         harmonics: int = 5) -> np.ndarray:
    """A filled ellipse whose border is perturbed by random low-order radial harmonics.

    Args:
        shape: (Y, X) of the output.
        center: (y, x) in pixels; radii: (ry, rx) in pixels; angle: rotation in radians.
        wobble: amplitude of the border perturbation relative to the radius.
    Returns:
        (Y, X) bool mask.
    """
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (ca * dx + sa * dy) / radii[1], (-sa * dx + ca * dy) / radii[0]
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    border = np.ones_like(theta)
    for k in range(2, harmonics + 2):
        border += wobble / k ** 0.7 * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 6.3))
    return rho < border


def xray_chest(rng: np.random.Generator, size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """A frontal chest radiograph look-alike.

    Dark lung fields inside a brighter thorax, the heart shadow overlapping the left lung, a
    bright spine and rib arcs, vessel markings, film blur and noise. Lungs are dark (air
    attenuates little), bone bright, outside the body black.

    Returns:
        ``(image, labels)``: (Y, X) uint8 and (Y, X) uint8 with 1 = lung (both fields).
    """
    s = size / 192.0
    shape = (size, size)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cx = size / 2 + rng.uniform(-8, 8) * s
    top = rng.uniform(22, 36) * s
    body = blob(shape, (size * 0.58, cx), (size * 0.55, rng.uniform(78, 90) * s), rng, wobble=0.03)
    lung_h = rng.uniform(95, 125) * s
    lung_w = rng.uniform(30, 40) * s
    gap = rng.uniform(12, 20) * s
    labels = np.zeros(shape, np.uint8)
    for side in (-1, 1):
        c = (top + lung_h / 2, cx + side * (gap + lung_w))
        field = blob(shape, c, (lung_h / 2, lung_w * rng.uniform(0.9, 1.1)), rng,
                     angle=side * rng.uniform(0.05, 0.2), wobble=0.1)
        field &= yy > top + rng.uniform(0, 8) * s            # flat apex cut
        labels[field & body] = 1
    heart = blob(shape, (top + lung_h * 0.72, cx + rng.uniform(8, 18) * s),
                 (rng.uniform(26, 34) * s, rng.uniform(30, 40) * s), rng, wobble=0.06)
    img = np.where(body, 0.62, 0.04).astype(np.float32)
    img -= 0.38 * ndimage.gaussian_filter(labels.astype(np.float32), 2.0 * s)
    img += 0.22 * ndimage.gaussian_filter((heart & body).astype(np.float32), 3.0 * s)
    spine = np.abs(xx - cx) < rng.uniform(9, 13) * s
    img += 0.18 * (spine & body)
    for k in range(rng.integers(6, 9)):                      # rib arcs across both fields
        y0 = top + (k + 0.5) * lung_h / 8 + rng.uniform(-3, 3) * s
        arc = y0 + 0.008 / s * (xx - cx) ** 2 * rng.uniform(0.7, 1.0) - 24 * s
        img += 0.08 * (np.abs(yy - arc) < rng.uniform(2.0, 3.0) * s) * body
    vessels = np.clip(smooth_noise(shape, 1.5 * s, rng), 1.2, None) - 1.2
    img += 0.12 * vessels * labels
    img += 0.05 * smooth_noise(shape, 12 * s, rng)           # exposure non-uniformity
    img = ndimage.gaussian_filter(img, rng.uniform(0.6, 1.4) * s)
    img = np.clip(img + rng.normal(0, rng.uniform(0.01, 0.03), shape), 0, 1)
    gamma = rng.uniform(0.8, 1.25)
    return (255 * img ** gamma).astype(np.uint8), labels


def skin_lesion(rng: np.random.Generator, size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """A dermoscopy-like RGB image of one pigmented lesion on skin.

    Skin of random tone with texture, an irregular lesion of varying size, position, colour
    and internal variegation, optional hairs, uneven illumination and a dark circular vignette.

    Returns:
        ``(image, labels)``: (Y, X, 3) uint8 and (Y, X) uint8 with 1 = lesion.
    """
    s = size / 192.0
    shape = (size, size)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    skin = np.array([rng.uniform(0.72, 0.92), rng.uniform(0.52, 0.72), rng.uniform(0.42, 0.62)])
    img = np.ones((*shape, 3), np.float32) * skin
    img *= (1 + 0.04 * smooth_noise(shape, 3 * s, rng))[..., None]
    radius = rng.uniform(22, 58) * s
    center = (size / 2 + rng.uniform(-25, 25) * s, size / 2 + rng.uniform(-25, 25) * s)
    lesion = blob(shape, center, (radius * rng.uniform(0.7, 1.0), radius), rng,
                  angle=rng.uniform(0, np.pi), wobble=rng.uniform(0.08, 0.22), harmonics=7)
    lesion = ndimage.binary_opening(lesion, iterations=2)
    if not lesion.any():
        lesion = blob(shape, center, (radius, radius), rng, wobble=0.0)
    pigment = np.array([rng.uniform(0.25, 0.55), rng.uniform(0.14, 0.32), rng.uniform(0.08, 0.25)])
    mix = np.clip(0.75 + 0.35 * smooth_noise(shape, 4 * s, rng), 0.2, 1.0)
    soft = ndimage.gaussian_filter(lesion.astype(np.float32), rng.uniform(1.0, 2.5) * s)
    alpha = (soft * mix)[..., None]
    img = img * (1 - alpha) + pigment * alpha
    dots = (smooth_noise(shape, 1.2 * s, rng) > 1.8) & lesion
    img[dots] *= 0.55
    for _ in range(rng.integers(0, 6)):                          # hairs: thin dark curves
        t = np.linspace(0, 1, 400)
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        bend = rng.uniform(-30, 30, 2) * s
        py = p0[0] + (p1[0] - p0[0]) * t + bend[0] * np.sin(np.pi * t)
        px = p0[1] + (p1[1] - p0[1]) * t + bend[1] * np.sin(np.pi * t)
        ok = (py >= 0) & (py < size) & (px >= 0) & (px < size)
        hair = np.zeros(shape, bool)
        hair[py[ok].astype(int), px[ok].astype(int)] = True
        if rng.random() < 0.5:                                   # thicker hair
            hair = ndimage.binary_dilation(hair, iterations=1)
        img[hair] *= 0.35
    light = 1 + 0.12 * ((xx - size / 2) * rng.uniform(-1, 1) + (yy - size / 2) * rng.uniform(-1, 1)) / size
    vignette = np.clip(1.15 - (np.hypot(yy - size / 2, xx - size / 2) / (size * 0.52)) ** 4, 0.05, 1)
    img *= (light * vignette)[..., None]
    img += rng.normal(0, rng.uniform(0.01, 0.03), img.shape)
    return (255 * np.clip(img, 0, 1)).astype(np.uint8), lesion.astype(np.uint8)
