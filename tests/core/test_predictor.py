"""Acceptance 2.6: the predictor on CT uint16, MR float and RGB uint8 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote
from segmote_core.transforms import CT_WINDOWS, normalize_intensity


def _images(rng):
    ct = (rng.normal(40, 20, (97, 131)) + 1024).astype(np.uint16)  # stored = HU + 1024
    ct[30:60, 40:90] = 1024 + 300
    mr = rng.random((140, 90)).astype(np.float32) * 3.7
    rgb = rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)
    return [("CT", ct), ("MR", mr), ("DERM", rgb)]


PROMPTS = {
    "point": dict(point_coords=np.array([[20, 30], [40, 10]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([5, 8, 60, 70])),
    "points+box": dict(point_coords=np.array([[20, 30]]), point_labels=np.array([1]),
                       box=np.array([5, 8, 60, 70])),
    "auto": dict(auto=True),
}


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_predictor_each_image_kind_and_prompt(tiny_model_256, rng, kind):
    pred = SegMoTEPredictor(tiny_model_256)
    for modality, image in _images(rng):
        pred.set_image(image, modality=modality)
        out = pred.predict(**PROMPTS[kind])
        assert out.masks.shape == (1, *image.shape[:2]) and out.masks.dtype == bool
        assert out.low_res_logits.shape == (1, 128, 128)
        assert 0 <= out.expert_token < 4 and 0 <= out.expert < 4
        assert 0.0 <= out.confidence <= 1.0 and out.token_weights.shape == (4,)
        # the mask input path: refine with the previous logits
        again = pred.predict(**PROMPTS[kind], mask_input=out.low_res_logits)
        assert again.masks.shape == out.masks.shape
        multi = pred.predict(**PROMPTS[kind], multimask_output=True)
        assert multi.masks.shape == (4, *image.shape[:2]) and multi.scores.shape == (4,)
        heat = pred.routing_heatmaps()
        assert heat.shape == (4, *image.shape[:2]) and 0 <= heat.min() and heat.max() <= 1 + 1e-5


def test_embedding_round_trip_gives_identical_masks(tiny_model_256, rng):
    pred = SegMoTEPredictor(tiny_model_256)
    _, image = _images(rng)[0]
    pred.set_image(image, modality="CT")
    first = pred.predict(box=np.array([5, 5, 80, 60]))
    emb = pred.get_embedding()
    other = SegMoTEPredictor(tiny_model_256)
    other.set_embedding(emb)
    second = other.predict(box=np.array([5, 5, 80, 60]))
    np.testing.assert_array_equal(first.low_res_logits, second.low_res_logits)
    np.testing.assert_array_equal(first.masks, second.masks)
    with pytest.raises(ValueError, match="does not fit"):
        other.set_embedding({**emb, "image_embeddings": emb["image_embeddings"][:10]})


def test_masks_equal_stock_sampredictor_on_the_same_embedding(rng):
    """Experts/PPT off: same embedding + prompts -> the same masks as SamPredictor."""
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", num_expert_tokens=0, num_ppt_queries=0))
    ours = SegMoTEPredictor(model)
    image = rng.integers(0, 255, (150, 100, 3), dtype=np.uint8)
    ours.set_image(image, modality="DERM")
    stock = SamPredictor(model.sam)
    stock.set_image(image)  # stock preprocessing (PIL resize) ...
    stock.features = ours.features.image_embeddings  # ... but the same embedding
    for kw in PROMPTS["point"], PROMPTS["box"]:
        m_ours = ours.predict(**kw, multimask_output=True)
        m_stock, s_stock, l_stock = stock.predict(**kw, multimask_output=True)
        np.testing.assert_allclose(m_ours.low_res_logits, l_stock, atol=1e-5)
        np.testing.assert_allclose(m_ours.scores, s_stock, atol=1e-5)
        assert (m_ours.masks != m_stock).mean() < 1e-3


def test_normalisation_per_modality():
    ct = np.array([[-1000, 0], [40, 3000]], dtype=np.int16)
    out = normalize_intensity(ct, "CT", window="soft_tissue")
    c, w = CT_WINDOWS["soft_tissue"]
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255
    assert out[1, 0, 0] == pytest.approx((40 - (c - w / 2)) / w * 255)
    stored = (ct.astype(np.int32) + 1024).astype(np.uint16)
    np.testing.assert_allclose(normalize_intensity(stored, "CT"), out)
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(normalize_intensity(u8, "XR")[..., 1], u8.astype(np.float32))
    mr = np.linspace(0, 1, 10000, dtype=np.float32).reshape(100, 100)
    out = normalize_intensity(mr, "MR")
    assert out.min() == 0 and out.max() == 255
    with pytest.raises(ValueError, match="no finite"):
        normalize_intensity(np.full((4, 4), np.nan, np.float32), "MR")
    with pytest.raises(ValueError, match="2D"):
        normalize_intensity(np.zeros((2, 3, 4, 5)), "MR")
    with pytest.raises(ValueError, match="unknown CT window"):
        normalize_intensity(ct, "CT", window="nope")


def test_bf16_encoder_stays_close_to_fp32(tiny_model_256, rng):
    """The accuracy cost of bf16 autocast: small embedding error, near-identical masks."""
    _, image = _images(rng)[0]
    p32, p16 = SegMoTEPredictor(tiny_model_256, "fp32"), SegMoTEPredictor(tiny_model_256, "bf16")
    assert not p32.bf16 and p16.bf16
    p32.set_image(image, modality="CT")
    p16.set_image(image, modality="CT")
    e32, e16 = p32.features.image_embeddings, p16.features.image_embeddings
    assert e16.dtype == torch.float32
    rel = ((e16 - e32).norm() / e32.norm()).item()
    assert 0 < rel < 0.05
    with pytest.raises(ValueError, match="precision"):
        SegMoTEPredictor(tiny_model_256, "fp8")


def test_text_category_joins_the_prompt(tiny_model_256, rng):
    pred = SegMoTEPredictor(tiny_model_256)
    assert pred.categories == ("brain", "lesion")
    _, image = _images(rng)[1]
    pred.set_image(image, modality="MR")
    box = np.array([5, 8, 60, 70])
    plain = pred.predict(box=box)
    named = pred.predict(box=box, text="lesion")
    again = pred.predict(box=box, text="lesion")
    assert named.masks.shape == plain.masks.shape
    assert not np.array_equal(named.low_res_logits, plain.low_res_logits)
    np.testing.assert_array_equal(named.low_res_logits, again.low_res_logits)
    assert pred.routing_heatmaps().shape[0] == 4
    with pytest.raises(ValueError, match="unknown category"):
        pred.predict(box=box, text="liver")
