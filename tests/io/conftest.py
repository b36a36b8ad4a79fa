"""Fixtures of the I/O, cache and volume tests."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote


@pytest.fixture(scope="session")
def tiny_model_128():
    """One random-weight tiny SegMoTE at 128 px input, shared by the session (cheap on 2 cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return build_segmote(SegMoTEConfig(model_type="tiny", image_size=128)).eval()


@pytest.fixture
def predictor(tiny_model_128):
    return SegMoTEPredictor(tiny_model_128, precision="fp32")
