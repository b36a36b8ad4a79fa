"""One "does not match" family: every store that refuses stale data raises a subclass of
SegMoTEMismatchError (a ValueError) named for that store, naming the path."""

from __future__ import annotations

import pytest
import torch

import segmote_core
from pipeline.store import OutputStore
from segmote_core.cache import EmbeddingCache
from segmote_core.errors import (EmbeddingCacheMismatchError, FeatureCacheMismatchError,
                                 OutputStoreMismatchError, SegMoTEMismatchError)
from training.precompute import FeatureCache


def test_family_shape():
    for cls in (EmbeddingCacheMismatchError, FeatureCacheMismatchError, OutputStoreMismatchError):
        assert issubclass(cls, SegMoTEMismatchError) and issubclass(cls, ValueError)
    assert segmote_core.SegMoTEMismatchError is SegMoTEMismatchError


def test_each_store_raises_its_own_subclass(tmp_path):
    EmbeddingCache(tmp_path / "e.zarr", {"model": "a"}, n_slices=1)
    with pytest.raises(EmbeddingCacheMismatchError, match=r"e\.zarr.*model"):
        EmbeddingCache(tmp_path / "e.zarr", {"model": "b"}, n_slices=1)

    FeatureCache(torch.zeros(1, 2, 2, 2), None, {"encoder": "a"}).save(tmp_path / "f.safetensors")
    with pytest.raises(FeatureCacheMismatchError, match=r"f\.safetensors"):
        FeatureCache.load(tmp_path / "f.safetensors", {"encoder": "b"})

    cohort = tmp_path / "cohort.zarr"
    cohort.mkdir()
    store = OutputStore(tmp_path / "out.zarr", cohort, {"model": "a"})
    store.begin("c1", (1, 2, 2))
    store.finish("c1", [0.5], [0], {})
    store.close() if hasattr(store, "close") else None
    with pytest.raises(SegMoTEMismatchError, match=r"out\.zarr.*--overwrite") as err:
        OutputStore(tmp_path / "out.zarr", cohort, {"model": "b"})
    assert type(err.value) is OutputStoreMismatchError
