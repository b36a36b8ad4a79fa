"""``segmote batch --categories``: one PPT pass per category on one embedding per slice,
resolved into one label map by the higher logit (docs/pipeline.md, "Several categories").

- the label map equals per-category predictor calls (``predict(auto=True, text=...)``)
  resolved by logit, slice by slice, and the embedding is computed once per slice;
- an unknown category is refused before Ray starts (exit 2, the known ones listed);
- a run SIGKILLed after its first complete case, then resumed, equals an uninterrupted one;
- a store made with other categories is refused unless --overwrite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.report import read_report
from pipeline.worker import ModelSpec, SegmentWorker, SliceTask
from segmote_core import SegMoTEConfig, build_segmote, save_segmote
from segmote_core.build import load_segmote
from segmote_core.categories import resolve_categories, segment_categories
from segmote_core.cli import main as segmote_main
from segmote_core.io import open_cohort
from segmote_core.predictor import SegMoTEPredictor
from tests.pipeline.helpers import (REPO, attrs_of, kill_after_first_case, labels_of,
                                    make_cohort, subprocess_env)

VOCAB = ("liver", "kidney", "spine", "lung")
CATS = ["liver", "kidney", "spine"]
SLICES = 4
CASES = ["case_000", "case_001", "case_002"]


def category_checkpoint(path: Path, seed: int = 0) -> Path:
    """A real tiny SegMoTE with a text vocabulary; random weights, text tokens and router gate
    scaled so the categories answer differently and overlap."""
    torch.manual_seed(seed)
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=128, vocabulary=VOCAB))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("w_gate"):
                p.normal_(0.0, 0.1)
        model.text_encoder.table.weight.normal_(0.0, 3.0)
    # recorded as trained: random weights standing in for a trained model
    return save_segmote(model, path, training={"note": "random weights (tests)"})


@pytest.fixture(scope="module")
def category_checkpoint_file(tmp_path_factory) -> Path:
    """``category_checkpoint`` saved once for this module."""
    return category_checkpoint(tmp_path_factory.mktemp("category_model") / "cat.safetensors")


@pytest.fixture(scope="module")
def clean_cohort(tmp_path_factory) -> Path:
    """The CASES, SLICES slices of 40 x 40 each, none corrupt."""
    cohort = tmp_path_factory.mktemp("category_cohort") / "cohort.zarr"
    make_cohort(cohort, n_cases=len(CASES), slices=SLICES, size=40, corrupt=None)
    return cohort


def _args(cohort: Path, out: Path, ckpt: Path, *cats: str) -> list[str]:
    return [str(cohort), str(out), "--segmote-checkpoint", str(ckpt), "--batch-size", "2",
            "--num-cpus", "2", "--no-progress", "--categories", *(cats or CATS)]


def test_label_map_equals_per_category_predictor_calls_resolved_by_logit(
        category_checkpoint_file, clean_cohort):
    ckpt, cohort = category_checkpoint_file, clean_cohort
    model = load_segmote(ckpt)
    image = np.asarray(open_cohort(cohort).case("case_000").image[...])
    encodes = []
    hook = model.sam.image_encoder.register_forward_hook(
        lambda _m, args, _o: encodes.append(int(args[0].shape[0])))
    try:
        res = segment_categories(model, image, CATS, "CT")
    finally:
        hook.remove()
    assert sum(encodes) == SLICES  # each slice embedded once, whatever the categories
    pred = SegMoTEPredictor(model)
    values = set()
    for z in range(SLICES):
        pred.set_image(image[z], "CT")
        logits = np.stack([pred.predict(auto=True, text=c, return_logits=True).masks[0]
                           for c in CATS])
        want = np.where(logits.max(0) > 0, logits.argmax(0) + 1, 0)
        np.testing.assert_array_equal(res.labels[z], want)
        for j, c in enumerate(CATS):
            p = pred.predict(auto=True, text=c)
            assert res.confidence[j, z] == pytest.approx(p.confidence, abs=1e-5)
            assert res.expert[j, z] == p.expert
        values |= set(np.unique(want).tolist())
        # where liver and kidney claim a pixel (spine lower), the higher logit won
        both = (logits[0] > 0) & (logits[1] > 0) & (logits[2] < np.minimum(logits[0], logits[1]))
        if both.any():
            assert (res.labels[z][both] == np.where(logits[0] >= logits[1], 1, 2)[both]).all()
    assert len(values - {0}) >= 2, values  # the test sees more than one category
    # the worker (what the actors run) writes exactly that, with per-category results
    worker = SegmentWorker(ModelSpec(str(ckpt)), threads=2)
    out = worker(SliceTask("case_000", 0, image, "CT", categories=tuple(CATS)))
    assert out.error is None
    np.testing.assert_array_equal(out.labels, res.labels)
    assert sorted(out.categories) == sorted(CATS)
    np.testing.assert_allclose(out.categories["kidney"]["confidence"], res.confidence[1])


def test_category_names_are_checked():
    assert resolve_categories(["all"], VOCAB) == VOCAB
    assert resolve_categories(["spine", "liver", "spine"], VOCAB) == ("spine", "liver")
    with pytest.raises(ValueError, match="known categories: liver, kidney, spine, lung"):
        resolve_categories(["liver", "pancreas"], VOCAB)
    with pytest.raises(ValueError, match="no category vocabulary"):
        resolve_categories(["liver"], ())


def test_unknown_category_refused_before_ray_starts(category_checkpoint_file, clean_cohort,
                                                   tmp_path):
    ckpt, cohort = category_checkpoint_file, clean_cohort
    out = tmp_path / "out.zarr"
    code = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code,
                           *_args(cohort, out, ckpt, "liver", "pancreas")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pancreas" in proc.stderr and "known categories: liver, kidney, spine, lung" \
        in proc.stderr
    assert proc.stdout.strip() == "NO_RAY"
    assert not out.exists()  # nothing written, not even the store


@pytest.fixture(scope="module")
def uninterrupted_run(category_checkpoint_file, clean_cohort, tmp_path_factory):
    """One uninterrupted ``segmote batch --categories liver kidney spine`` in this process:
    its store and exit code."""
    out = tmp_path_factory.mktemp("category_out") / "reference.zarr"
    rc = segmote_main(["batch", *_args(clean_cohort, out, category_checkpoint_file)])
    return out, rc


def test_multi_category_store_report_and_attrs(category_checkpoint_file, clean_cohort,
                                               uninterrupted_run):
    ckpt, cohort = category_checkpoint_file, clean_cohort
    out, rc = uninterrupted_run
    assert rc == 0
    table = {"1": "liver", "2": "kidney", "3": "spine"}
    root = zarr.open_group(str(out), mode="r")
    assert dict(root.attrs)["label_table"] == table
    assert dict(root.attrs)["signature"]["categories"] == CATS
    model = load_segmote(ckpt)
    coh = open_cohort(cohort)
    report = read_report(out).set_index("case")
    for case_id, lab in labels_of(out).items():
        a = attrs_of(out)[case_id]
        assert a["label_table"] == table and a["complete"] is True
        image = np.asarray(coh.case(case_id).image[...])
        for z in range(0, SLICES, 2):  # the pipeline's --batch-size 2
            ref = segment_categories(model, image[z:z + 2], CATS, "CT")
            np.testing.assert_array_equal(lab[z:z + 2], ref.labels)
        assert set(a["categories"]) == set(CATS)
        for c, per in a["categories"].items():
            assert per["value"] == int({v: k for k, v in table.items()}[c])
            assert len(per["confidence"]) == len(per["qc"]) == SLICES
            # QC rated exactly where the category's own mask is not empty
        worst = [min(v for v in vals if v is not None) if any(v is not None for v in vals)
                 else None for vals in zip(*(a["categories"][c]["qc"] for c in CATS))]
        assert a["qc"] == worst  # a slice is as good as its worst category
        row = json.loads(report.loc[case_id, "categories"])
        assert set(row) == set(CATS)
        for c in CATS:
            assert row[c]["qc"] == a["categories"][c]["qc_case"]
            assert row[c]["empty_slices"] == sum(v is None for v in a["categories"][c]["qc"])


def test_sigkill_then_resume_equals_uninterrupted_multi_category_run(
        category_checkpoint_file, clean_cohort, uninterrupted_run, tmp_path):
    ckpt, cohort = category_checkpoint_file, clean_cohort
    ref_out = uninterrupted_run[0]
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "pipeline", *_args(cohort, out, ckpt)]
    done_before, _ = kill_after_first_case(cmd, out)
    assert 1 <= len(done_before) < len(CASES), done_before
    assert segmote_main(["batch", *_args(cohort, out, ckpt)]) == 0
    report = read_report(out).set_index("case")
    assert sorted(report.index[report.status == "skipped"]) == sorted(done_before)
    labels, ref_labels = labels_of(out), labels_of(ref_out)
    attrs, ref_attrs = attrs_of(out), attrs_of(ref_out)
    assert sorted(labels) == CASES
    for case_id in CASES:
        np.testing.assert_array_equal(labels[case_id], ref_labels[case_id])
        for key in ("signature_sha256", "label_table", "expert", "qc", "categories"):
            assert attrs[case_id][key] == ref_attrs[case_id][key], key
    ref_report = read_report(ref_out).set_index("case")
    assert report["categories"].tolist() == ref_report["categories"].tolist()


def test_other_categories_refused_unless_overwrite(category_checkpoint_file, clean_cohort,
                                                   uninterrupted_run, tmp_path):
    ckpt, cohort = category_checkpoint_file, clean_cohort
    import shutil

    out = tmp_path / "store.zarr"
    shutil.copytree(uninterrupted_run[0], out)
    before = labels_of(out)
    # another order is another label table: refused, nothing touched
    rc = segmote_main(["batch", *_args(cohort, out, ckpt, "kidney", "liver", "spine")])
    assert rc == 2
    for case_id, lab in labels_of(out).items():
        np.testing.assert_array_equal(lab, before[case_id])
    assert dict(zarr.open_group(str(out), mode="r").attrs)["label_table"]["1"] == "liver"
    # with --overwrite the store is replaced and says so in its table
    rc = segmote_main(["batch", *_args(cohort, out, ckpt, "kidney", "liver", "spine"),
                       "--overwrite"])
    assert rc == 0
    root = zarr.open_group(str(out), mode="r")
    assert dict(root.attrs)["label_table"] == {"1": "kidney", "2": "liver", "3": "spine"}
    after = labels_of(out)
    for case_id in CASES:  # the same pixels, values swapped 1 <-> 2
        swap = np.array([0, 2, 1, 3], np.uint8)[before[case_id]]
        np.testing.assert_array_equal(after[case_id], swap)


def test_export_carries_the_label_table(uninterrupted_run, tmp_path):
    import csv

    from segmote_core.export import export_store

    out, _ = uninterrupted_run
    res = export_store(out, tmp_path / "export")
    assert res.ok, res.errors
    rows = list(csv.DictReader(open(res.csv)))
    table = {"1": "liver", "2": "kidney", "3": "spine"}
    assert rows and {r["case"] for r in rows} == set(CASES)
    for r in rows:
        assert r["category"] == table[r["value"]]
    for case_id, lab in labels_of(out).items():
        present = {str(v) for v in np.unique(lab) if v}
        assert {r["value"] for r in rows if r["case"] == case_id} == present
