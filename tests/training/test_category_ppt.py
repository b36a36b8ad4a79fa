"""Category-conditioned PPT (docs/model.md, "Category-conditioned PPT"): with
``prompts.ppt_category_text`` the PPT steps keep the category's text token to the end of the
schedule, multi-category masks included; without it PPT sees binary targets and no text once
the progressive guide has faded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from segmote_core.build import build_segmote
from segmote_core.config import SegMoTEConfig
from training.dataset import build_slice_dataset
from training.prompts import PromptSampler
from training.step import training_loss
from training.train_config import LossConfig, PromptConfig, TrainConfig

MODEL = SegMoTEConfig(model_type="tiny", image_size=64, train_decoder=True)


@pytest.fixture(scope="module")
def dataset(tiny_cohort):
    return build_slice_dataset(tiny_cohort, image_size=64, split=None)


def _sampler(ds, **prompts) -> PromptSampler:
    return PromptSampler(ds, PromptConfig(p_box=0.0, p_points=0.0, p_auto=1.0, **prompts),
                         batch_size=6, vocabulary=ds.vocabulary(), seed=3)


def _sparse_tokens(model, ds, batch) -> tuple[int, torch.Tensor]:
    """How many sparse prompt tokens the decoder received, and the masks it answered."""
    seen = []
    hook = model.expert_decoder.register_forward_pre_hook(
        lambda _m, args: seen.append(int(args[3].shape[1])))
    try:
        feats = model.encode(model.preprocess(
            torch.from_numpy(ds.images[ds.mask_slice[batch.mask_ids]]).float()))
        target = torch.from_numpy(ds.masks[batch.mask_ids]).float()
        with torch.no_grad():
            res = training_loss(model, feats, batch, target, LossConfig())
    finally:
        hook.remove()
    return seen[-1], res.output.low_res_masks


def test_option_changes_what_ppt_sees_at_the_schedule_end(dataset):
    total = 100
    late = range(90, 100)            # the progressive guide is 0 after half the schedule
    off = [_sampler(dataset).sample(s, total) for s in late]
    on = [_sampler(dataset, ppt_category_text=1.0).sample(s, total) for s in late]
    vocab = dataset.vocabulary()
    # the paper's PPT at the end: binary targets only, no text, no guide
    assert all(b.mode == "auto" and b.text_ids is None and b.guide is None for b in off)
    assert all(dataset.binary[b.mask_ids].all() for b in off)
    # category-conditioned: every item still carries its own category's text token, and the
    # multi-category masks (rim, core) are PPT targets too; the mask guide has faded
    assert all(b.category and b.guide is None and b.text_ids is not None for b in on)
    for b in on:
        names = [vocab[i] for i in b.text_ids]
        assert names == [dataset.categories[m] for m in b.mask_ids]
    drawn = {dataset.categories[m] for b in on for m in b.mask_ids}
    assert {"rim", "core"} <= drawn, drawn
    # ... and the decoder sees it: PPT's Q tokens plus the text token, a different answer
    torch.manual_seed(0)
    model = build_segmote(MODEL.replace(vocabulary=vocab)).eval()
    n_off, _ = _sparse_tokens(model, dataset, off[0])
    n_on, masks_on = _sparse_tokens(model, dataset, on[0])
    assert n_off == MODEL.num_ppt_queries
    assert n_on == MODEL.num_ppt_queries + 1
    plain = on[0].__class__(mask_ids=on[0].mask_ids, mode="auto")
    _, masks_plain = _sparse_tokens(model, dataset, plain)
    assert not torch.allclose(masks_on, masks_plain)


def test_early_steps_still_fade_the_mask_guide(dataset):
    total = 1000
    on = _sampler(dataset, ppt_category_text=1.0)
    early = [on.sample(s, total).guide for s in range(40)]
    late = [on.sample(s, total).guide for s in range(600, 640)]
    assert early.count("mask") > 30        # guide probability ~1 at the start
    assert set(late) == {None}             # 0 after half the schedule
    assert "text" not in early             # the text is not a guide here: always on


def test_absent_category_asks_for_an_empty_mask(tiny_cohort, tmp_path):
    path = tmp_path / "cohort.zarr"
    shutil.copytree(tiny_cohort, path)
    lab = zarr.open_group(str(path), mode="r+")["disc_00"]["labels"]
    first = np.asarray(lab[0])
    first[first == 2] = 1                  # slice 0 of disc_00 holds no core
    lab[0] = first
    ds = build_slice_dataset(path, image_size=64, split=None)
    sampler = _sampler(ds, ppt_category_text=1.0, ppt_absent=1.0)
    vocab = ds.vocabulary()
    lacking = {s for s in range(ds.num_slices) if ds.cases[s] == "disc_00" and ds.z[s] == 0}
    seen = 0
    for step in range(200):
        b = sampler.sample(step, 200)
        for row, m in enumerate(b.mask_ids):
            if int(ds.mask_slice[m]) in lacking:
                seen += 1
                assert b.empty is not None and b.empty[row]
                assert vocab[b.text_ids[row]] == "core"
            elif b.empty is not None:
                assert not b.empty[row]    # every other slice holds both rim and core
    assert seen > 0
    # the loss of such an item is the loss against an empty target
    b = next(x for x in (sampler.sample(s, 200) for s in range(200)) if x.empty is not None)
    torch.manual_seed(0)
    model = build_segmote(MODEL.replace(vocabulary=vocab)).eval()
    feats = model.encode(model.preprocess(
        torch.from_numpy(ds.images[ds.mask_slice[b.mask_ids]]).float()))
    target = torch.from_numpy(ds.masks[b.mask_ids]).float()
    zeroed = target.clone()
    zeroed[torch.from_numpy(b.empty)] = 0
    plain = b.__class__(**{**b.__dict__, "empty": None})
    with torch.no_grad():
        got = training_loss(model, feats, b, target, LossConfig()).terms.total
        want = training_loss(model, feats, plain, zeroed, LossConfig()).terms.total
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_option_is_checked_and_off_by_default():
    assert TrainConfig().prompts.ppt_category_text == 0.0
    with pytest.raises(ValueError, match="ppt_category_text"):
        TrainConfig(prompts=PromptConfig(ppt_category_text=1.5))
