"""The training and evaluation paths rewritten for the GPU (no host sync before backward,
uint8 and cache copies in their stored dtype, one host copy per evaluation group) give the same
values as before, checked on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from segmote_core import SegMoTEConfig, build_segmote
from training.dataset import model_input
from training.losses import dice_loss, segmentation_loss
from training.precompute import FeatureCache
from training.train_config import LossConfig


def test_loss_terms_are_detached_tensors_with_the_old_values():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 16, generator=g, requires_grad=True)
    target = (torch.rand(3, 16, 16, generator=g) > 0.5).float()
    balance = torch.tensor(0.25, requires_grad=True)
    w = LossConfig()
    terms = segmentation_loss(logits, target, w, balance=balance)
    for v in (terms.seg, terms.dice, terms.balance):
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
    d = dice_loss(logits, target).mean()
    assert float(terms.dice) == float(d)
    assert float(terms.balance) == 0.25
    assert f"{terms.seg:.6f}" == f"{float(terms.seg):.6f}"  # the CSV writer's format works
    assert abs(float(terms.total) - (float(terms.seg) + w.balance * 0.25)) < 1e-6
    terms.total.backward()
    assert logits.grad is not None and balance.grad is not None


def test_model_input_from_uint8_equals_the_float_path():
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=64)).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    extents = np.array([[64, 48], [40, 64]])
    got = model_input(model, images, extents)
    x = torch.as_tensor(images, dtype=torch.float32)
    want = torch.cat([model.preprocess(x[b:b + 1, :, :h, :w]) for b, (h, w) in enumerate(extents)])
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_cache_gather_equals_indexing():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 4, 2, 2, generator=g).to(torch.bfloat16)
    cache = FeatureCache(emb, None, {"x": "y"})
    got = cache.get([3, 1, 3], "cpu")
    assert got.image_embeddings.dtype == torch.float32
    assert torch.equal(got.image_embeddings, emb[[3, 1, 3]].float())
    assert got.interm_embeddings is None
