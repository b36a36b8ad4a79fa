"""Fixtures of the core model tests."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig, build_segmote


@pytest.fixture
def tiny_config() -> SegMoTEConfig:
    """The tiny random-weight SAM at its default 256 px input, with a two-word text vocabulary."""
    return SegMoTEConfig(model_type="tiny", vocabulary=("brain", "lesion"))


@pytest.fixture
def tiny_model_256(tiny_config):
    """A fresh tiny SegMoTE per test (tests may change its weights)."""
    torch.manual_seed(0)
    return build_segmote(tiny_config)


@pytest.fixture
def rng():
    """A seeded numpy generator."""
    import numpy as np

    return np.random.default_rng(0)
