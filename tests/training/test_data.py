"""Training data: config schema, dataset building from a cohort, prompt sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from tests.training.cohorts import write_tiny_cohort
from training.dataset import build_slice_dataset, prepare_labels
from training.prompts import (PromptSampler, guide_probability, jitter_boxes, mask_boxes,
                              sample_points)
from training.train_config import PromptConfig, TrainConfig, load_train_config
from training.trainer import lr_at_epoch


# ----------------------------------------------------------------------------- config
def test_yaml_config_roundtrip_paths_and_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "model: {model_type: tiny, image_size: 64, num_experts: 2}\n"
        "data: {cohort: data/c.zarr, datasets: [a, b]}\n"
        "optim: {epochs: 3, lr_milestones: [1, 2], lr: 0.001}\n"
        "output_dir: out\n")
    cfg = load_train_config(cfg_file, {"optim.batch_size": 3, "loss.bce": 0.5})
    assert cfg.model.num_experts == 2 and cfg.model.resolved_image_size == 64
    assert cfg.data.cohort == str(tmp_path / "data" / "c.zarr")
    assert cfg.data.datasets == ("a", "b")
    assert cfg.output_dir == str(tmp_path / "out")
    assert cfg.optim.batch_size == 3 and cfg.loss.bce == 0.5
    assert [lr_at_epoch(cfg, e) for e in range(3)] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    # defaults follow docs/model.md (loss and schedule)
    d = TrainConfig()
    assert (d.optim.lr, d.optim.lr_milestones, d.optim.lr_gamma, d.loss.balance) == \
        (1e-4, (7, 12), 0.5, 0.01)
    assert [lr_at_epoch(d, e) for e in (0, 6, 7, 11, 12, 13)] == \
        pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5])
    assert (d.prompts.p_box, d.prompts.p_points, d.prompts.p_auto) == (0.4, 0.3, 0.3)


@pytest.mark.parametrize("text, match", [
    ("optim: {epoch: 3}\n", r"optim: unknown keys \['epoch'\]"),
    ("modle: {}\n", r"unknown keys \['modle'\]"),
    ("model: {model_type: huge}\n", "model_type must be one of"),
    ("prompts: {p_box: 1.5}\n", r"prompts.p_box must be in \[0, 1\]"),
    ("phase: pretrain\n", "phase must be one of"),
    ("optim: [1, 2]\n", "section must be a mapping"),
])
def test_bad_config_names_file_and_key(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_train_config(f)
    assert str(f) in str(info.value)


# ----------------------------------------------------------------------------- dataset
def test_dataset_masks_categories_and_flags(tiny_cohort):
    ds = build_slice_dataset(tiny_cohort, image_size=64, keep_original=True, split=None)
    # 3 volumes x 6 slices, each with rim, core and the union disc; 4 lesion images
    assert ds.num_slices == 22 and ds.num_masks == 3 * 6 * 3 + 4
    assert ds.vocabulary() == ("core", "disc", "lesion", "rim")
    assert ds.images.shape == (22, 3, 64, 64) and ds.images.dtype == np.uint8
    cats = np.array(ds.categories)
    assert ds.binary[cats == "disc"].all() and ds.binary[cats == "lesion"].all()
    assert not ds.binary[np.isin(cats, ["rim", "core"])].any()
    assert ds.needs_text[np.isin(cats, ["rim", "core"])].all()
    assert not ds.needs_text[np.isin(cats, ["disc", "lesion"])].any()
    # the union is exactly rim | core on every slice, at both resolutions
    for s in range(18):
        ms = {ds.categories[m]: m for m in np.flatnonzero(ds.mask_slice == s)}
        assert np.array_equal(ds.masks[ms["disc"]], ds.masks[ms["rim"]] | ds.masks[ms["core"]])
        assert np.array_equal(ds.original_masks[ms["disc"]],
                              ds.original_masks[ms["rim"]] | ds.original_masks[ms["core"]])
    # a 64x64 volume slice fills the 64 px input; the 48 px lesion image is resized to 64
    assert tuple(ds.extents[0]) == (64, 64) and tuple(ds.original_shapes[-1]) == (48, 48)
    lesion = np.flatnonzero(cats == "lesion")[0]
    ratio = ds.masks[lesion].sum() / ds.original_masks[lesion].sum()
    assert ratio == pytest.approx((64 / 48) ** 2, rel=0.1)
    assert ds.modalities[0] == "MR" and ds.modalities[-1] == "DERM"
    s = ds.summary()
    assert s["datasets"]["discs"]["masks"] == {"rim": 18, "core": 18, "disc": 18}
    assert s["datasets"]["spots"]["cases"] == 4


def test_prepare_labels_pads_and_keeps_ids():
    lab = np.zeros((30, 60), np.uint8)
    lab[5:15, 10:50] = 2
    out = prepare_labels(lab, 120)
    assert out.shape == (120, 120)
    assert set(np.unique(out)) == {0, 2}
    assert out[60:].max() == 0            # padding below the 60-row resized image
    assert (out == 2).sum() == pytest.approx(4 * (lab == 2).sum(), rel=0.05)


def test_selection_restricts_cases_slices_and_split(tiny_cohort, tmp_path):
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps({"cases": {
        "disc_00": {"split": "train", "slices": [1, 2]},
        "disc_01": {"split": "test", "slices": [0]},
        "spot_00": {"split": "train"}}}))
    train = build_slice_dataset(tiny_cohort, image_size=64, selection=sel, split="train")
    assert sorted(set(train.cases)) == ["disc_00", "spot_00"]
    assert sorted(train.z[np.array(train.cases) == "disc_00"].tolist()) == [1, 2]
    test = build_slice_dataset(tiny_cohort, image_size=64, selection=sel, split="test")
    assert set(test.cases) == {"disc_01"} and test.num_slices == 1
    sel.write_text(json.dumps({"cases": {"disc_00": {"split": "train", "slices": [99]}}}))
    with pytest.raises(ValueError, match=r"slices \[99\] outside 0..5 of case 'disc_00'"):
        build_slice_dataset(tiny_cohort, image_size=64, selection=sel, split="train")


def test_bad_cohorts_give_clear_errors(tmp_path):
    path = write_tiny_cohort(tmp_path / "c.zarr")
    root = zarr.open_group(str(path), mode="r+")
    root["disc_01"].attrs["categories"] = {}
    with pytest.raises(ValueError, match=r"case 'disc_01': attrs\['categories'\]"):
        build_slice_dataset(path, image_size=64)
    root["disc_01"].attrs["categories"] = {"1": "rim", "2": "core"}
    del root["spot_02"]["labels"]
    with pytest.raises(ValueError, match="case 'spot_02': no 'labels' array"):
        build_slice_dataset(path, image_size=64)
    with pytest.raises(FileNotFoundError, match="cohort not found"):
        build_slice_dataset(tmp_path / "nope.zarr", image_size=64)


# ----------------------------------------------------------------------------- prompts
def test_boxes_points_and_jitter():
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 5:20, 10:31] = True
    masks[1, 30, 45] = True
    assert mask_boxes(masks).tolist() == [[10, 5, 30, 19], [45, 30, 45, 30]]
    rng = np.random.default_rng(0)
    boxes = np.array([[10, 5, 30, 19]] * 200, np.float32)
    jit = jitter_boxes(boxes, rng, 0.1, 50)
    assert np.abs(jit[:, 0] - 10).max() <= 0.1 * 21 + 1e-4
    assert np.abs(jit[:, 3] - 19).max() <= 0.1 * 15 + 1e-4
    assert np.abs(jit - boxes).max() > 1.0           # it does move
    coords, labels = sample_points(masks[0], rng, n_pos=3, n_neg=2)
    assert labels.tolist() == [1, 1, 1, 0, 0]
    xs, ys = coords[:, 0].astype(int), coords[:, 1].astype(int)
    assert masks[0][ys[:3], xs[:3]].all() and not masks[0][ys[3:], xs[3:]].any()
    # negatives come from near the object: inside the box grown by 20 %
    assert (xs[3:] >= 10 - 6).all() and (xs[3:] <= 30 + 6).all()


def test_sampler_modes_text_pools_and_determinism(tiny_cohort):
    ds = build_slice_dataset(tiny_cohort, image_size=64, split=None)
    vocab = ds.vocabulary()
    sampler = PromptSampler(ds, PromptConfig(), batch_size=4, vocabulary=vocab, seed=3)
    total = 600
    batches = [sampler.sample(s, total) for s in range(total)]
    modes = np.array([b.mode for b in batches])
    freq = {m: float((modes == m).mean()) for m in ("box", "points", "auto")}
    assert freq["box"] == pytest.approx(0.4, abs=0.06)
    assert freq["points"] == pytest.approx(0.3, abs=0.06)
    assert freq["auto"] == pytest.approx(0.3, abs=0.06)
    cats = np.array(ds.categories)
    for b in batches:
        if b.mode == "auto":
            assert ds.binary[b.mask_ids].all()          # PPT only on binary targets
            assert b.boxes is None and b.point_coords is None
        elif b.text_ids is None:
            assert not ds.needs_text[b.mask_ids].any()  # ambiguous parts only with text
        else:
            assert [vocab[t] for t in b.text_ids] == cats[b.mask_ids].tolist()
        if b.mode == "points":
            assert b.point_coords.shape == (4, 5, 2)
            assert ((b.point_labels == 1).sum(1) >= 1).all()
    # guides: only in the first half, decaying
    guided = np.array([b.guide is not None for b in batches if b.mode == "auto"])
    steps = np.array([s for s, b in enumerate(batches) if b.mode == "auto"])
    assert not guided[steps >= total // 2].any()
    assert guided[steps < total // 6].mean() > 0.6
    assert {b.guide for b in batches if b.guide} == {"text", "mask"}
    # a step's prompts depend on (seed, step) only: a resumed run draws the same
    again = PromptSampler(ds, PromptConfig(), batch_size=4, vocabulary=vocab, seed=3)
    b1, b2 = sampler.sample(123, total), again.sample(123, total)
    assert b1.mode == b2.mode and np.array_equal(b1.mask_ids, b2.mask_ids)
    assert guide_probability(0, 100, 1.0, 0.5) == 1.0
    assert guide_probability(25, 100, 1.0, 0.5) == pytest.approx(0.5)
    assert guide_probability(50, 100, 1.0, 0.5) == 0.0


def test_sampler_rejects_categories_outside_vocabulary(tiny_cohort):
    ds = build_slice_dataset(tiny_cohort, image_size=64, split=None)
    with pytest.raises(ValueError, match=r"categories \['lesion'\].*not in the model's vocab"):
        PromptSampler(ds, PromptConfig(), batch_size=2, vocabulary=("core", "disc", "rim"))


@pytest.mark.parametrize("balance", [False, True])
def test_category_weights_shift_the_draw(tiny_cohort, balance):
    ds = build_slice_dataset(tiny_cohort, image_size=64, split=None)
    cats = np.array(ds.categories)
    target = sorted(set(cats))[0]

    def share(weights):
        s = PromptSampler(ds, PromptConfig(p_box=1.0, p_points=0.0, p_auto=0.0), batch_size=4,
                          balance_datasets=balance, category_weights=weights, seed=5)
        ids = np.concatenate([s.sample(i, 400).mask_ids for i in range(400)])
        return float((cats[ids] == target).mean())

    plain, heavy = share(None), share({target: 6.0})
    assert heavy > plain + 0.15
    if not balance:  # balanced: the dataset is drawn first, the weight acts within it
        assert heavy > 0.5
    with pytest.raises(ValueError, match=r"category_weights names \['nerve'\]"):
        PromptSampler(ds, PromptConfig(), batch_size=2, category_weights={"nerve": 2.0})


def test_category_weights_in_yaml_must_be_positive(tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("data: {category_weights: {white_matter: 2.0}}\n")
    assert dict(load_train_config(f).data.category_weights) == {"white_matter": 2.0}
    f.write_text("data: {category_weights: {white_matter: 0}}\n")
    with pytest.raises(ValueError, match="category_weights must be positive"):
        load_train_config(f)
