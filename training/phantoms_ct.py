"""A CT phantom in Hounsfield units: axial slices from the lower thorax to the upper abdomen.

Air -1000 outside, a body ellipse of soft tissue (~40 HU) in a subcutaneous fat layer (~-100),
lungs (~-800, with vessels) in the upper slices, the liver (~60) on the patient's right (image
left) from the lung bases down, kidneys (~30) beside the spine in the lower slices, the spine
(vertebral body and posterior arch, ~700 with a denser cortex) on every slice, plus unlabelled
aorta and bowel gas. Organ sizes, positions and shapes vary per patient and along z; each organ
keeps its border shape through the slices. Noise and texture are random per patient.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .phantoms import blob, smooth_noise

__all__ = ["CT_CATEGORIES", "ct_volume"]

CT_CATEGORIES = {"1": "lung", "2": "liver", "3": "kidney", "4": "spine"}


def _organ(shape: tuple[int, int], seed: int, center: tuple[float, float],
           radii: tuple[float, float], angle: float = 0.0, wobble: float = 0.08) -> np.ndarray:
    """A blob whose border harmonics come from ``seed`` (the same shape on every slice)."""
    if min(radii) <= 1.0:
        return np.zeros(shape, bool)
    return blob(shape, center, radii, np.random.default_rng(seed), angle=angle, wobble=wobble)


def ct_volume(rng: np.random.Generator, slices: int = 16,
              size: int = 192) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One CT phantom patient.

    Args:
        rng: the patient's generator (all randomness comes from it).
        slices: Z, from the lower thorax (z = 0) to the upper abdomen (z = Z - 1).
        size: in-plane Y = X in pixels.
    Returns:
        ``(image, labels, spacing)``: (Z, Y, X) int16 HU; (Z, Y, X) uint8 ids of
        :data:`CT_CATEGORIES`; spacing (z, y, x) in mm.
    """
    s = size / 192.0
    shape = (size, size)
    cy, cx = size / 2 + rng.uniform(-6, 6) * s, size / 2 + rng.uniform(-6, 6) * s
    body_r = (rng.uniform(56, 70) * s, rng.uniform(76, 90) * s)
    fat = rng.uniform(4, 12) * s
    lung_end = rng.uniform(0.5, 0.7)
    liver_start, kidney_start = rng.uniform(0.2, 0.4), rng.uniform(0.55, 0.7)
    lung_r = (rng.uniform(30, 40) * s, rng.uniform(22, 30) * s)
    liver_r = (rng.uniform(34, 44) * s, rng.uniform(30, 40) * s)
    kidney_r = (rng.uniform(10, 14) * s, rng.uniform(7, 10) * s)
    vert_r = rng.uniform(9, 12) * s
    seeds = rng.integers(0, 2 ** 31, 8)
    hu = {"soft": rng.uniform(30, 50), "fat": rng.uniform(-120, -85), "lung": rng.uniform(-850, -760),
          "liver": rng.uniform(52, 70), "kidney": rng.uniform(22, 38), "bone": rng.uniform(600, 760)}
    noise_sd = rng.uniform(8, 22)
    texture = smooth_noise((slices, *shape), 2.0 * s, rng)
    image = np.empty((slices, *shape), np.int16)
    labels = np.zeros((slices, *shape), np.uint8)
    for z in range(slices):
        t = z / max(slices - 1, 1)
        body = _organ(shape, seeds[0], (cy, cx), body_r, wobble=0.03)
        inner = ndimage.binary_erosion(body, iterations=max(int(fat), 1))
        img = np.full(shape, -1000.0, np.float32)
        img[body] = hu["fat"]
        img[inner] = hu["soft"]
        lab = np.zeros(shape, np.uint8)
        vy = cy + body_r[0] * 0.55
        # liver (patient's right = image left), growing below its dome
        grow = np.clip((t - liver_start) / 0.25, 0, 1)
        if grow > 0:
            liver = _organ(shape, seeds[1], (cy - 2 * s, cx - body_r[1] * 0.38),
                           (liver_r[0] * np.sqrt(grow), liver_r[1] * np.sqrt(grow)),
                           angle=0.3, wobble=0.1) & inner
            img[liver], lab[liver] = hu["liver"], 2
        # lungs: largest in mid-thorax, shrinking to the bases
        f = np.sin(np.pi * min((t + 0.35) / (lung_end + 0.35), 1.0))
        if t < lung_end and f > 0.15:
            for side, seed in ((-1, seeds[2]), (1, seeds[3])):
                lung = _organ(shape, seed, (cy - 4 * s, cx + side * body_r[1] * 0.42),
                              (lung_r[0] * f, lung_r[1] * f), angle=side * 0.25, wobble=0.1) & inner
                img[lung], lab[lung] = hu["lung"], 1
        # kidneys beside the spine
        k = np.clip((t - kidney_start) / 0.15, 0, 1)
        if k > 0:
            for side, seed in ((-1, seeds[4]), (1, seeds[5])):
                kid = _organ(shape, seed, (vy - 6 * s, cx + side * (vert_r + 24 * s)),
                             (kidney_r[0] * np.sqrt(k), kidney_r[1] * np.sqrt(k)),
                             angle=side * 0.5, wobble=0.05) & inner
                capsule = ndimage.binary_dilation(kid, iterations=2) & ~kid & (lab == 0)
                img[capsule] = hu["fat"]                        # perirenal fat
                img[kid], lab[kid] = hu["kidney"], 3
        # aorta (unlabelled blood) and, in the abdomen, bowel gas
        aorta = _organ(shape, seeds[6], (vy - vert_r - 8 * s, cx - 4 * s), (7 * s, 7 * s), wobble=0.0)
        img[aorta & (lab == 0)] = hu["soft"] + 5
        if t > liver_start + 0.2:
            gas_rng = np.random.default_rng(int(seeds[7]) + z)
            for _ in range(3):
                gas = blob(shape, (cy - body_r[0] * 0.35 + gas_rng.uniform(-8, 8) * s,
                                   cx + gas_rng.uniform(5, 45) * s), (5 * s, 7 * s), gas_rng)
                img[gas & inner & (lab == 0)] = -950
        # spine: vertebral body + posterior arch, dense cortex
        vert = _organ(shape, seeds[6] + 1, (vy, cx), (vert_r * 0.9, vert_r), wobble=0.03)
        arch = _organ(shape, seeds[6] + 2, (vy + vert_r * 1.3, cx), (vert_r * 0.5, vert_r * 0.35))
        bone = (vert | arch) & inner
        img[bone] = hu["bone"]
        img[bone & ~ndimage.binary_erosion(bone, iterations=2)] = hu["bone"] + 300
        lab[bone] = 4
        vessels = (smooth_noise(shape, 1.2 * s, np.random.default_rng(int(seeds[2]) + z)) > 1.9)
        img[vessels & (lab == 1)] = -100
        img = img + 12.0 * texture[z] * (lab != 1)
        img = ndimage.gaussian_filter(img, 0.7 * s) + rng.normal(0, noise_sd, shape)
        image[z] = np.clip(img, -1024, 3000).astype(np.int16)
        labels[z] = lab
    return image, labels, (5.0, 1.5 / s, 1.5 / s)
