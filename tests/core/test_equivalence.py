"""Acceptance 2.1: with expert tokens and PPT off, SegMoTE's decoder is stock SAM's."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig, build_segmote
from segmote_core.modeling import ImageFeatures

TOL = 1e-5


@pytest.fixture(scope="module", params=["tiny", "vit_b"])
def plain(request):
    """A SegMoTE with experts/PPT off; vit_b keeps SAM's real 256-wide decoder."""
    torch.manual_seed(1)
    cfg = SegMoTEConfig(model_type=request.param, num_expert_tokens=0, num_ppt_queries=0,
                        hq_fusion=False)
    return build_segmote(cfg)


def _stock(model, emb, points=None, boxes=None, masks=None, multimask=False):
    sam = model.sam
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=multimask)


def _embedding(model, b=1):
    c = model.config.preset.prompt_dim
    s = model.config.embedding_size
    return torch.randn(b, c, s, s)


def _prompts(model, n, kind):
    size = model.image_size
    g = torch.Generator().manual_seed(n)
    out = {}
    if kind in ("points", "points+box"):
        out["points"] = (torch.rand(n, 3, 2, generator=g) * size,
                         torch.randint(0, 2, (n, 3), generator=g))
    if kind in ("box", "points+box"):
        xy = torch.rand(n, 2, generator=g) * size / 2
        out["boxes"] = torch.cat([xy, xy + size / 3], dim=1)
    if kind == "mask":
        s4 = model.config.embedding_size * 4
        out["points"] = (torch.rand(n, 1, 2, generator=g) * size, torch.ones(n, 1, dtype=torch.long))
        out["masks"] = torch.randn(n, 1, s4, s4, generator=g)
    return out


@pytest.mark.parametrize("kind", ["points", "box", "points+box", "mask"])
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_decoder_equals_stock_sam(plain, kind, multimask, n):
    torch.manual_seed(2)
    emb = _embedding(plain)
    pr = _prompts(plain, n, kind)
    ref_masks, ref_iou = _stock(plain, emb, pr.get("points"), pr.get("boxes"), pr.get("masks"),
                                multimask)
    out = plain.decode(ImageFeatures(emb, None), points=pr.get("points"), boxes=pr.get("boxes"),
                       mask_inputs=pr.get("masks"), multimask_output=multimask)
    assert out.low_res_masks.shape == ref_masks.shape
    assert (out.low_res_masks - ref_masks).abs().max().item() < TOL
    assert (out.iou_predictions - ref_iou).abs().max().item() < TOL
    assert out.expert_masks is None and out.balance_loss.item() == 0.0


@torch.no_grad()
def test_batched_images_equal_per_image_stock_calls(plain):
    """B images with one prompt set each == B separate stock calls (no repeated embeddings)."""
    torch.manual_seed(3)
    b = 4
    emb = _embedding(plain, b)
    pr = _prompts(plain, b, "points+box")
    out = plain.decode(ImageFeatures(emb, None), points=pr["points"], boxes=pr["boxes"])
    for i in range(b):
        ref, ref_iou = _stock(plain, emb[i:i + 1], (pr["points"][0][i:i + 1], pr["points"][1][i:i + 1]),
                              pr["boxes"][i:i + 1])
        assert (out.low_res_masks[i:i + 1] - ref).abs().max().item() < TOL
        assert (out.iou_predictions[i:i + 1] - ref_iou).abs().max().item() < TOL


@torch.no_grad()
def test_stock_decoder_rejects_batched_images_but_segmote_does_not(plain):
    emb = _embedding(plain, 2)
    pr = _prompts(plain, 2, "box")
    with pytest.raises(RuntimeError):
        _stock(plain, emb, boxes=pr["boxes"])  # SAM repeats each image per prompt: shape error
    out = plain.decode(ImageFeatures(emb, None), boxes=pr["boxes"])
    assert out.low_res_masks.shape[0] == 2


def test_mismatched_batch_is_a_clear_error(plain):
    emb = _embedding(plain, 2)
    pr = _prompts(plain, 3, "box")
    with pytest.raises(ValueError, match="prompt sets"):
        plain.decode(ImageFeatures(emb, None), boxes=pr["boxes"])


def test_grad_mode_path_equals_stock(plain):
    """Training runs with autograd on: torch.softmax and a fresh positional encoding."""
    torch.manual_seed(3)
    emb = _embedding(plain)
    pr = _prompts(plain, 2, "points+box")
    with torch.no_grad():
        ref_masks, ref_iou = _stock(plain, emb, pr["points"], pr["boxes"])
    assert torch.is_grad_enabled()
    out = plain.decode(ImageFeatures(emb, None), points=pr["points"], boxes=pr["boxes"])
    assert (out.low_res_masks - ref_masks).abs().max().item() < TOL
    assert (out.iou_predictions - ref_iou).abs().max().item() < TOL


@torch.no_grad()
def test_dense_pe_is_cached_and_follows_the_prompt_encoder(plain):
    first = plain.dense_pe()
    assert plain.dense_pe() is first
    assert torch.equal(first, plain.sam.prompt_encoder.get_dense_pe())
    matrix = plain.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    saved = matrix.clone()
    matrix.mul_(2.0)  # an edit in place (e.g. load_state_dict) must not reuse the old encoding
    try:
        changed = plain.dense_pe()
        assert changed is not first and not torch.equal(changed, first)
        assert torch.equal(changed, plain.sam.prompt_encoder.get_dense_pe())
    finally:
        matrix.copy_(saved)
    assert torch.equal(plain.dense_pe(), first)
