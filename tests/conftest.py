"""Shared fixtures: small random-weight models built from stock segment_anything modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmote_core import SegMoTEConfig, build_segmote


@pytest.fixture
def tiny_config() -> SegMoTEConfig:
    return SegMoTEConfig(model_type="tiny", vocabulary=("brain", "lesion"))


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_segmote(tiny_config)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def disk_image(shape=(120, 150), centre=(60, 70), radius=25, dtype=np.uint8, lo=20, hi=200):
    """A bright disk on a dark background (Y, X) and its mask."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    img = np.where(mask, hi, lo).astype(dtype)
    return img, mask
