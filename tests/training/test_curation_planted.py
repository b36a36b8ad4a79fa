"""Curation: planted bad slices rank last, the split is patient-disjoint.

Cohorts are real zarr stores written with segmote_core.io.write_case; `segmote curate` runs
through the real CLI entry point.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from segmote_core.cli import main as segmote_main
from segmote_core.io import create_cohort, write_case
from training.curation import CurationConfig, curate, split_patients
from training.selection import load_selection


def _good_slice(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc (label 1) with a core (label 2) on a noisy background."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(26, 38, 2)
    r = rng.uniform(13, 20)
    d = np.hypot(yy - cy, xx - cx)
    labels = np.zeros((size, size), np.uint8)
    labels[d < r] = 1
    labels[d < 0.5 * r] = 2
    image = 100 + 300 * (labels == 1) + 700 * (labels == 2) + rng.normal(0, 15, (size, size))
    return image.astype(np.float32), labels


def _plant(image: np.ndarray, labels: np.ndarray, kind: str, rng: np.random.Generator):
    if kind == "blank":
        return np.full_like(image, 100.0), labels
    if kind == "noise":
        return rng.uniform(0, 1100, image.shape).astype(np.float32), labels
    if kind == "tiny":
        tiny = np.zeros_like(labels)
        tiny[30:32, 30:32] = 1
        return image, tiny
    raise ValueError(kind)


PLANTED = {("vol_02", 1): "blank", ("vol_03", 4): "noise", ("vol_04", 6): "tiny"}
PLANTED_2D = {"img_003": "blank", "img_007": "noise", "img_011": "tiny"}
REASON = {"blank": "blank", "noise": "noise", "tiny": "tiny foreground"}


@pytest.fixture(scope="module")
def planted_cohort(tmp_path_factory) -> Path:
    """Volumes of 6 patients (8 slices) and 2D images of 14 patients, with planted bad slices."""
    path = tmp_path_factory.mktemp("curation") / "planted.zarr"
    rng = np.random.default_rng(7)
    create_cohort(path)
    for i in range(6):
        image, labels = zip(*(_good_slice(rng) for _ in range(8)))
        image, labels = np.stack(image), np.stack(labels)
        for z in range(8):
            kind = PLANTED.get((f"vol_{i:02d}", z))
            if kind:
                image[z], labels[z] = _plant(image[z], labels[z], kind, rng)
        write_case(path, f"vol_{i:02d}", image, spacing=(2.0, 1.0, 1.0), modality="MR",
                   labels=labels, attrs={"dataset": "discs", "patient": f"pv{i}",
                                         "categories": {"1": "rim", "2": "core"}})
    for i in range(14):
        image, labels = _good_slice(rng)
        kind = PLANTED_2D.get(f"img_{i:03d}")
        if kind:
            image, labels = _plant(image, labels, kind, rng)
        write_case(path, f"img_{i:03d}", image.astype(np.int16), spacing=(0.5, 0.5),
                   modality="XR", labels=(labels > 0).astype(np.uint8),
                   attrs={"dataset": "flat", "patient": f"pi{i // 2}",   # 2 images per patient
                          "categories": {"1": "disc"}, "auto_category": "disc"})
    return path


def _rows(report: Path) -> list[dict[str, str]]:
    with open(report, newline="") as fh:
        return list(csv.DictReader(fh))


def test_planted_slices_rank_last_and_are_dropped(planted_cohort, tmp_path):
    before = sorted((p.relative_to(planted_cohort), p.stat().st_mtime_ns)
                    for p in planted_cohort.rglob("*"))
    code = segmote_main(["curate", str(planted_cohort), str(tmp_path / "out"), "--keep", "0.8"])
    assert code == 0
    rows = _rows(tmp_path / "out" / "curation_report.csv")
    assert len(rows) == 6 * 8 + 14
    vol = sorted((r for r in rows if r["dataset"] == "discs"), key=lambda r: int(r["rank"]))
    last = {(r["case_id"], int(r["z"])): r["reason"] for r in vol[-3:]}
    assert set(last) == set(PLANTED)
    for key, kind in PLANTED.items():
        assert last[key] == REASON[kind]
    flat = sorted((r for r in rows if r["dataset"] == "flat"), key=lambda r: int(r["rank"]))
    assert {r["case_id"] for r in flat[-3:]} == set(PLANTED_2D)
    for r in flat[-3:]:
        assert r["reason"] == REASON[PLANTED_2D[r["case_id"]]] and r["kept"] == "False"
    # keep 0.8 of 48 volume slices -> 39 kept (ceil), none of them planted
    assert sum(r["kept"] == "True" for r in vol) == 39
    assert [int(r["rank"]) for r in vol] == list(range(1, 49))
    sel = load_selection(tmp_path / "out" / "selection.json")
    for (case_id, z) in PLANTED:
        assert z not in (sel.slices(case_id) or ())
    assert not set(PLANTED_2D) & set(sel.case_ids())          # a dropped 2D image leaves the cases
    kept_csv = {(r["case_id"], int(r["z"])) for r in vol if r["kept"] == "True"}
    kept_sel = {(c, z) for c in sel.case_ids() if c.startswith("vol") for z in sel.slices(c)}
    assert kept_csv == kept_sel
    summary = json.loads((tmp_path / "out" / "curation_summary.json").read_text())
    assert summary["datasets"]["discs"]["reasons"]["blank"] == 1
    assert summary["datasets"]["flat"]["reasons"]["noise"] == 1
    assert summary["scored_slices"] == 62
    after = sorted((p.relative_to(planted_cohort), p.stat().st_mtime_ns)
                   for p in planted_cohort.rglob("*"))
    assert before == after                                     # the cohort was only read


def test_combined_score_alone_ranks_planted_slices_low(planted_cohort, tmp_path):
    """Without the flag penalty the robust combined score still puts them at the bottom."""
    res = curate(planted_cohort, tmp_path / "sel.json",
                 config=CurationConfig(keep=0.8, flag_penalty=0.0))
    vol = [r for r in res.rows if r["dataset"] == "discs"]
    worst = {(r["case_id"], r["z"]) for r in sorted(vol, key=lambda r: r["score"])[:3]}
    assert worst == set(PLANTED)
    assert (tmp_path / "sel_report.csv").is_file() and (tmp_path / "sel_summary.json").is_file()


def test_split_is_patient_disjoint_and_nine_to_one(planted_cohort, tmp_path):
    res = curate(planted_cohort, tmp_path / "a", keep=1.0, seed=3)
    sel = load_selection(res.paths["selection"])
    side_of: dict[str, set[str]] = {}
    for r in res.rows:
        if r["kept"]:
            side_of.setdefault(r["patient"], set()).add(sel.split_of[r["case_id"]])
    assert all(len(s) == 1 for s in side_of.values())         # nobody on both sides
    flat_test = {r["patient"] for r in res.rows
                 if r["dataset"] == "flat" and r["kept"] and r["split"] == "test"}
    assert len(flat_test) == 1                                 # round(0.1 * 7 patients) -> 1
    # many patients: ~9:1, deterministic for a seed, different for another seed
    rows = [{"dataset": "big", "patient": f"p{i:03d}"} for i in range(200) for _ in range(2)]
    side = split_patients(rows, 0.1, seed=1)
    assert sum(v == "test" for v in side.values()) == 20 and len(side) == 200
    assert side == split_patients(rows, 0.1, seed=1)
    assert side != split_patients(rows, 0.1, seed=2)
    # a patient in two datasets stays on one side
    rows += [{"dataset": "zz_other", "patient": f"p{i:03d}"} for i in range(0, 200, 5)]
    side2 = split_patients(rows, 0.1, seed=1)
    assert {p: side2[p] for p in side} == side


def test_curate_errors_name_the_problem(planted_cohort, tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CurationConfig(keep=1.5)
    with pytest.raises(ValueError, match="inside the cohort"):
        curate(planted_cohort, planted_cohort / "sel")
    unlabelled = tmp_path / "nolabels.zarr"
    create_cohort(unlabelled)
    write_case(unlabelled, "case_a", np.zeros((4, 16, 16), np.float32), modality="CT")
    with pytest.raises(ValueError, match="case_a.*labels"):
        curate(unlabelled, tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        curate(tmp_path / "missing.zarr", tmp_path / "y")
