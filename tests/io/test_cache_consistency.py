"""A signed embedding cache is never filled with embeddings of another model or normalisation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from segmote_core import SegMoTEPredictor
from segmote_core.cache import EmbeddingCacheMismatchError, EmbeddingCache
from segmote_core.volume import PredictorSegmenter, SlicePrompt, propagate

from tests.io.volumes import EncoderCalls, ct_volume


def test_compute_and_propagate_refuse_a_different_normalisation_or_model(tmp_path, tiny_model_128,
                                                                          predictor):
    vol, _ = ct_volume((3, 20, 24))
    cache = EmbeddingCache.for_volume(tmp_path / "e.zarr", predictor, vol, modality="CT")
    calls = EncoderCalls(tiny_model_128)
    try:
        with pytest.raises(EmbeddingCacheMismatchError, match=r"e\.zarr.*modality \(cache 'CT', now 'MR'\)"):
            cache.compute_volume(vol, predictor, "MR")
        with pytest.raises(EmbeddingCacheMismatchError, match="window"):
            cache.compute_volume(vol, predictor, "CT", window="lung")
        with pytest.raises(EmbeddingCacheMismatchError, match="3 slice"):
            cache.compute_volume(vol[:2], predictor, "CT")
        other = copy.deepcopy(tiny_model_128)
        with torch.no_grad():
            next(other.sam.image_encoder.parameters()).add_(1e-3)
        with pytest.raises(EmbeddingCacheMismatchError, match="weights_sha256"):
            cache.compute_volume(vol, SegMoTEPredictor(other, precision="fp32"), "CT")
        tuned = copy.deepcopy(tiny_model_128)    # a fine-tune: same encoder, other decoder
        with torch.no_grad():
            next(tuned.sam.mask_decoder.parameters()).add_(1e-3)
        cache.check_compatible(SegMoTEPredictor(tuned, precision="fp32"), "CT")
        with pytest.raises(EmbeddingCacheMismatchError, match="modality"):
            PredictorSegmenter(predictor, vol, "MR", cache=cache)
        assert calls.images == 0 and cache.done_slices() == []      # nothing computed or stored
        assert cache.compute_volume(vol, predictor, "CT") == 3 and calls.images == 3
        res = propagate(PredictorSegmenter(predictor, vol, "CT", cache=cache),
                        {1: SlicePrompt(box=np.array([4, 4, 18, 15], np.float32))})
        assert calls.images == 3 and res.mask.shape == vol.shape    # all from the cache
    finally:
        calls.close()
