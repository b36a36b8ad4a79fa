"""Synthetic volumes and an encoder-call counter shared by the I/O, cache and volume tests."""

from __future__ import annotations

import numpy as np


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float],
              radii: tuple[float, float, float]) -> np.ndarray:
    """(Z, Y, X) bool ellipsoid."""
    zz, yy, xx = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    d = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii))
    return d <= 1.0


def ct_volume(shape=(8, 40, 48), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU volume, bool object): a bright ellipsoid in soft tissue, air outside a body."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, np.int16)
    body = ellipsoid(shape, (shape[0] / 2, shape[1] / 2, shape[2] / 2),
                     (shape[0], shape[1] * 0.45, shape[2] * 0.45))
    vol[body] = 40
    obj = ellipsoid(shape, (shape[0] / 2, shape[1] / 2, shape[2] / 2 + 3),
                    (shape[0] * 0.3, shape[1] * 0.2, shape[2] * 0.15))
    vol[obj] = 200
    vol = vol + rng.integers(-5, 6, shape).astype(np.int16)
    return vol, obj


class EncoderCalls:
    """Counts images through the real SAM image encoder with a forward hook."""

    def __init__(self, model) -> None:
        self.images = 0
        self._h = model.sam.image_encoder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.images += int(inputs[0].shape[0])

    def close(self) -> None:
        self._h.remove()
