"""The signed embedding cache: reused without an encoder call, refused after model or data change."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pytest
import torch

import segmote_core
from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote
from segmote_core.cache import EmbeddingCacheMismatchError, EmbeddingCache, data_signature
from segmote_core.io import create_cohort, open_image
from segmote_core.progress import CancelToken, Cancelled

from tests.io.volumes import EncoderCalls, ct_volume


@pytest.fixture
def ct_image(tmp_path):
    vol, _ = ct_volume((5, 24, 28))
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.diag([0.8, 0.8, 2.0, 1.0])),
             tmp_path / "ct.nii.gz")
    return open_image(tmp_path / "ct.nii.gz"), vol


def test_second_open_reuses_embeddings_without_the_encoder(tmp_path, tiny_model_128, ct_image):
    img, vol = ct_image
    calls = EncoderCalls(tiny_model_128)
    try:
        p1 = SegMoTEPredictor(tiny_model_128, precision="fp32")
        steps = []
        cache = EmbeddingCache.for_volume(tmp_path / "emb.zarr", p1, img, modality="CT")
        assert cache.compute_volume(img, p1, "CT", progress=lambda d, t: steps.append((d, t)),
                                    batch=2) == 5
        assert calls.images == 5 and steps[0] == (0, 5) and steps[-1] == (5, 5)

        p2 = SegMoTEPredictor(tiny_model_128, precision="fp32")          # "second open"
        again = EmbeddingCache.for_volume(tmp_path / "emb.zarr", p2, img, modality="CT")
        assert again.done_slices() == [0, 1, 2, 3, 4]
        assert again.compute_volume(img, p2, "CT") == 0
        assert calls.images == 5                                     # no encoder call
        emb = again.get(3)
        p2.set_embedding(emb)
        assert calls.images == 5
        box = np.array([4, 4, 20, 18], np.float32)
        from_cache = p2.predict(box=box)
        p1.set_image(vol[3], modality="CT")                           # the direct path
        assert calls.images == 6
        direct = p1.predict(box=box)
        # stored in half precision (docs/formats.md): equal to fp16 rounding
        np.testing.assert_allclose(emb["image_embeddings"],
                                   p1.get_embedding()["image_embeddings"], rtol=1e-3, atol=1e-3)
        a, b = from_cache.masks, direct.masks
        # random weights put most logits near 0; the demo model: benchmarks/bench_cache_size.py
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98
        diff = np.abs(from_cache.low_res_logits - direct.low_res_logits)
        assert np.median(diff) < 0.01 and diff.max() < 0.5
    finally:
        calls.close()


def test_refused_after_the_model_changes(tmp_path, tiny_model_128, ct_image):
    img, _ = ct_image
    p = SegMoTEPredictor(tiny_model_128, precision="fp32")
    EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, img).compute_volume(img, p)
    other = copy.deepcopy(tiny_model_128)
    with torch.no_grad():
        next(other.sam.image_encoder.parameters()).add_(1e-3)     # one weight differs
    with pytest.raises(EmbeddingCacheMismatchError, match=r"emb\.zarr.*weights_sha256"):
        EmbeddingCache.for_volume(tmp_path / "emb.zarr", SegMoTEPredictor(other), img)
    torch.manual_seed(0)
    reconfigured = build_segmote(SegMoTEConfig(model_type="tiny", image_size=256))
    with pytest.raises(EmbeddingCacheMismatchError, match="image_size"):
        EmbeddingCache.for_volume(tmp_path / "emb.zarr", SegMoTEPredictor(reconfigured), img)
    # the added parts (experts, PPT, decoder) do not enter the embeddings: a fine-tuned model
    # of the same encoder reuses the cache
    tuned = copy.deepcopy(tiny_model_128)
    with torch.no_grad():
        next(tuned.expert_decoder.parameters()).add_(1e-3)
    again = EmbeddingCache.for_volume(tmp_path / "emb.zarr", SegMoTEPredictor(tuned), img)
    assert again.done_slices() == list(range(img.shape[0]))


def test_refused_after_the_data_or_version_changes(tmp_path, tiny_model_128, ct_image, monkeypatch):
    img, vol = ct_image
    p = SegMoTEPredictor(tiny_model_128, precision="fp32")
    EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, vol).compute_volume(vol, p)
    changed = vol.copy()
    changed[4, 10, 10] += 1                                            # one voxel
    assert data_signature(changed) != data_signature(vol) == data_signature(img)
    with pytest.raises(EmbeddingCacheMismatchError, match="data_sha256"):
        EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, changed)
    with pytest.raises(EmbeddingCacheMismatchError, match="window"):
        EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, vol, window="lung")
    monkeypatch.setattr(segmote_core, "__version__", "9.9.9")
    with pytest.raises(EmbeddingCacheMismatchError, match="segmote_version"):
        EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, vol)
    monkeypatch.undo()
    fresh = EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, changed, overwrite=True)
    assert fresh.done_slices() == []
    assert fresh.compute_volume(changed, p) == 5


def test_cancel_keeps_what_was_computed_and_a_rerun_resumes(tmp_path, tiny_model_128, ct_image):
    img, _ = ct_image
    p = SegMoTEPredictor(tiny_model_128, precision="fp32")
    token = CancelToken()

    def progress(done: int, total: int) -> None:
        if done >= 2:
            token.cancel()

    cache = EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, img)
    with pytest.raises(Cancelled):
        cache.compute_volume(img, p, progress=progress, cancel=token, batch=2)
    assert cache.done_slices() == [0, 1]
    calls = EncoderCalls(tiny_model_128)
    try:
        resumed = EmbeddingCache.for_volume(tmp_path / "emb.zarr", p, img)
        assert resumed.compute_volume(img, p, batch=2) == 3 and calls.images == 3
    finally:
        calls.close()
    assert resumed.done_slices() == [0, 1, 2, 3, 4]


def test_put_get_grow_and_foreign_store(tmp_path, predictor):
    predictor.set_image(np.arange(30 * 40, dtype=np.float32).reshape(30, 40))
    emb = predictor.get_embedding()
    cache = EmbeddingCache(tmp_path / "c.zarr", {"model": predictor.model_signature(), "d": 1})
    assert cache.get(0) is None and 7 not in cache
    cache.put(7, emb)                                                  # grows on demand
    got = cache.get(7)
    assert got["original_size"] == (30, 40) and cache.get(3) is None
    # half precision, early features as their principal subspace (docs/formats.md)
    np.testing.assert_allclose(got["image_embeddings"], emb["image_embeddings"], rtol=1e-3,
                               atol=1e-3)
    ref = emb["interm_embeddings"]
    err = np.linalg.norm(got["interm_embeddings"] - ref) / np.linalg.norm(ref - ref.mean((0, 1)))
    assert got["interm_embeddings"].shape == ref.shape and err < 0.2
    assert cache.done_slices() == [7]
    create_cohort(tmp_path / "cohort.zarr")
    with pytest.raises(EmbeddingCacheMismatchError, match="not a SegMoTE embedding cache"):
        EmbeddingCache(tmp_path / "cohort.zarr", {"d": 1})


def test_a_version_1_cache_is_refused_by_its_version(tmp_path, predictor):
    import zarr

    predictor.set_image(np.arange(30 * 40, dtype=np.float32).reshape(30, 40))
    sig = {"model": predictor.model_signature(), "d": 1}
    cache = EmbeddingCache(tmp_path / "c.zarr", sig)
    cache.put(0, predictor.get_embedding())
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    root.attrs["segmote"] = {**root.attrs["segmote"], "version": 1}     # as the old format
    with pytest.raises(EmbeddingCacheMismatchError, match="format version 1.*reads version 2"):
        EmbeddingCache(tmp_path / "c.zarr", sig)
    fresh = EmbeddingCache(tmp_path / "c.zarr", sig, overwrite=True)
    assert fresh.done_slices() == []


def test_a_vit_b_slice_takes_at_most_4_mib(tmp_path):
    """Cohort scale: half precision + the early features' principal subspace (real vit_b shapes,
    random weights; features of a smooth image, the encoder is not run)."""
    rng = np.random.default_rng(0)
    low = rng.normal(size=(64, 64, 12)).astype(np.float32)
    interm = low @ rng.normal(size=(12, 768)).astype(np.float32) \
        + 0.01 * rng.normal(size=(64, 64, 768)).astype(np.float32)
    emb = {"image_embeddings": rng.normal(size=(256, 64, 64)).astype(np.float32) * 0.1,
           "interm_embeddings": interm, "original_size": (512, 512), "input_size": (1024, 1024)}
    cache = EmbeddingCache(tmp_path / "v.zarr", {"d": 1})
    for z in range(3):
        cache.put(z, emb)
    assert cache.bytes_per_slice() <= 4 * 2 ** 20
    got = cache.get(1)["interm_embeddings"]
    assert np.linalg.norm(got - interm) / np.linalg.norm(interm) < 0.02
