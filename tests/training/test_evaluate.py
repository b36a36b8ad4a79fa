"""Acceptance 4.5: ``segmote evaluate`` writes the Dice tables and the PNG figures."""

from __future__ import annotations

import argparse
import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from segmote_core.build import build_segmote
from segmote_core.checkpoint import save_segmote
from segmote_core.config import SegMoTEConfig
from training.commands import register_evaluate, register_train
from training.dataset import build_slice_dataset
from segmote_core.geometry import interior_point
from training.evaluate import evaluate_model, tables, write_report
from training.figures import usage_fractions
from training.losses import dice_loss, dice_score


def test_dice_values():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True                     # 16 px
    b = np.zeros_like(a)
    b[2:6, 2:4] = True                     # 8 px inside a
    assert dice_score(a, a) == 1.0
    assert dice_score(a, b) == pytest.approx(2 * 8 / 24)
    assert dice_score(a, ~a) == 0.0
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0
    t = torch.from_numpy(a[None]).float()
    assert float(dice_loss(t * 40 - 20, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(-t * 40 - 20, t)) == pytest.approx(1.0, abs=0.06)
    ring = np.zeros((21, 21), bool)
    ring[5:16, 5:16] = True
    assert interior_point(ring).tolist() == [10, 10]


def test_ground_truth_through_eval_geometry_scores_one(tiny_cohort):
    """The ground truth, mapped to the model input and back as evaluation maps predictions,
    matches the cohort's masks: the resize/pad bookkeeping is right."""
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=64))
    ds = build_slice_dataset(tiny_cohort, image_size=64, keep_original=True, split=None)
    scores = []
    for m in range(ds.num_masks):
        s = ds.mask_slice[m]
        logits = torch.from_numpy(ds.masks[m]).float()[None, None] * 20 - 10
        up = model.sam.postprocess_masks(logits, tuple(ds.extents[s]),
                                         tuple(ds.original_shapes[s]))
        scores.append(dice_score(up[0, 0].numpy() > 0, ds.original_masks[m]))
    assert min(scores) > 0.85 and np.mean(scores) > 0.95


@pytest.fixture(scope="module")
def result(tiny_cohort):
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=64,
                                        vocabulary=("core", "disc", "lesion", "rim")))
    ds = build_slice_dataset(tiny_cohort, image_size=64, keep_original=True, split=None)
    return evaluate_model(model, ds), ds


def test_evaluation_rows_and_tables(result):
    res, ds = result
    rows = res.rows
    assert len(rows[rows["mode"] == "box"]) == ds.num_masks
    assert len(rows[rows["mode"] == "point"]) == ds.num_masks
    auto = rows[rows["mode"] == "auto"]
    # prompt-free: every binary mask, and every category of a multi-category slice with its
    # text token as PPT's guide (category-conditioned PPT, what `segmote batch --categories` runs)
    assert len(auto) == ds.num_masks and set(auto["category"]) == {"disc", "lesion", "rim",
                                                                  "core"}
    assert rows["dice"].between(0, 1).all()
    # text tokens go with the ambiguous parts only, in every mode
    assert rows[rows["category"].isin(["rim", "core"])]["text"].all()
    assert not rows[rows["category"].isin(["disc", "lesion"])]["text"].any()
    assert rows["token"].between(0, 3).all() and rows["expert"].between(0, 3).all()
    t = tables(res)
    cat = t["categories"]
    for (dataset, category), g in rows.groupby(["dataset", "category"]):
        for mode, gm in g.groupby("mode"):
            assert cat.loc[(dataset, category), mode] == pytest.approx(gm["dice"].mean())
    assert t["datasets"].loc[("spots", "DERM"), "masks"] == 4
    # a dataset's auto stays the binary task's (Table 1): the categories have their own rows
    for (dataset, modality), g in rows[rows["binary"] & (rows["mode"] == "auto")].groupby(
            ["dataset", "modality"]):
        assert t["datasets"].loc[(dataset, modality), "auto"] == pytest.approx(g["dice"].mean())
    assert set(t["ppt"].columns) == {"point (w/o PPT)", "auto (PPT)", "masks"}
    frac = usage_fractions(rows, "token", 4)
    assert np.allclose(frac.sum(axis=1), 1.0)


def test_cli_evaluate_writes_tables_and_figures(tiny_cohort, tmp_path):
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=64,
                                        vocabulary=("core", "disc", "lesion", "rim")))
    # recorded as trained: the random weights stand in for a trained model (evaluation runs
    # prompt-free segmentation, which an untrained checkpoint is refused)
    ckpt = save_segmote(model, tmp_path / "m.safetensors", trained=("experts", "ppt"))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_train(sub)
    register_evaluate(sub)
    out = tmp_path / "eval"
    args = parser.parse_args(["evaluate", str(ckpt), str(tiny_cohort), str(out),
                              "--device", "cpu", "--title", "random tiny"])
    assert args.func(args) == 0
    for name in ("per_mask.csv", "table_datasets.csv", "table_categories.csv", "table_ppt.csv",
                 "tables.md", "summary.json"):
        assert (out / name).is_file(), name
    for name in ("expert_usage.png", "routing_heatmaps.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 0.01, name
    md = (out / "tables.md").read_text()
    assert "## random tiny" in md and "| discs | rim |" in md and "Table 4 style" in md
    per_mask = pd.read_csv(out / "per_mask.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_dice"]["box"] == pytest.approx(
        per_mask[per_mask["mode"] == "box"]["dice"].mean())


def test_report_without_experts_or_ppt(tiny_cohort, tmp_path):
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=64, num_expert_tokens=0,
                                        num_ppt_queries=0))
    ds = build_slice_dataset(tiny_cohort, image_size=64, keep_original=True, split=None,
                             datasets=["spots"])
    res = evaluate_model(model, ds)
    assert set(res.rows["mode"]) == {"point", "box"}
    assert (res.rows["token"] == -1).all()
    paths = write_report(res, tmp_path / "e")
    assert "expert_usage" not in paths and paths["tables_md"].is_file()
