"""Acceptance 1 and 2 of the batch pipeline on a real local Ray cluster and real zarr stores.

1. Five cases, one with a corrupt chunk: four complete label arrays, a report naming the corrupt
   case's error, exit code 1; the labels are what the model computes in-process.
2. The driver SIGKILLed after its first complete case, then the same command again: every case
   complete exactly once, labels and per-slice attrs equal to the uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.report import read_report
from segmote_core.build import load_segmote
from segmote_core.cli import main as segmote_main
from segmote_core.inference import segment_batch
from segmote_core.io import open_cohort
from segmote_core.qc import case_qc
from tests.pipeline.helpers import (attrs_of, kill_after_first_case, labels_of, make_cohort,
                                    tree_digest)

SLICES = 6
GOOD = ["case_000", "case_001", "case_003", "case_004"]



@pytest.fixture(scope="module")
def cohort_with_corrupt_case(tmp_path_factory) -> Path:
    """Five cases of SLICES slices; case_002's last chunk is garbage bytes."""
    cohort = tmp_path_factory.mktemp("pipeline_ray") / "cohort.zarr"
    make_cohort(cohort, n_cases=5, slices=SLICES, size=32, corrupt="case_002")
    return cohort


def _args(cohort: Path, out: Path, ckpt: Path) -> list[str]:
    return [str(cohort), str(out), "--segmote-checkpoint", str(ckpt), "--batch-size", "2",
            "--num-cpus", "2", "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted_run(cohort_with_corrupt_case, tiny_checkpoint_file, tmp_path_factory):
    """One uninterrupted run through the ``segmote`` entry point (in this process): its store,
    exit code, the input's digest before it, and its wall time."""
    cohort, ckpt = cohort_with_corrupt_case, tiny_checkpoint_file
    before = tree_digest(cohort)
    out = tmp_path_factory.mktemp("pipeline_ray_out") / "reference.zarr"
    t0 = time.perf_counter()
    rc = segmote_main(["batch", *_args(cohort, out, ckpt)])
    return out, rc, before, time.perf_counter() - t0


def test_corrupt_case_is_reported_and_the_rest_complete(cohort_with_corrupt_case,
                                                        tiny_checkpoint_file, uninterrupted_run):
    ckpt, cohort = tiny_checkpoint_file, cohort_with_corrupt_case
    out, rc, before, _ = uninterrupted_run
    assert rc == 1  # one case failed
    assert tree_digest(cohort) == before  # the input was not written to
    labels, attrs = labels_of(out), attrs_of(out)
    assert sorted(labels) == GOOD  # the corrupt case left no partial output
    coh = open_cohort(cohort)
    model = load_segmote(ckpt)
    for case_id in GOOD:
        image = np.asarray(coh.case(case_id).image[...])
        assert labels[case_id].shape == image.shape and labels[case_id].dtype == np.uint8
        a = attrs[case_id]
        assert a["complete"] is True and a["slices"] == SLICES and a["mode"] == "auto"
        assert len(a["confidence"]) == SLICES and len(a["expert"]) == SLICES
        assert a["signature"]["model"]["config"]["model_type"] == "tiny"
        # what the model gives in-process, batch by batch (the pipeline's --batch-size 2)
        for z in range(0, SLICES, 2):
            ref = segment_batch(model, image[z:z + 2], "CT")
            np.testing.assert_array_equal(labels[case_id][z:z + 2], ref.masks.astype(np.uint8))
            np.testing.assert_allclose(a["confidence"][z:z + 2], ref.confidence, atol=1e-5)
            assert a["expert"][z:z + 2] == ref.expert.tolist()
    assert sum(int(lab.sum()) for lab in labels.values()) > 0
    report = read_report(out).set_index("case")
    assert report.index.tolist() == ["case_000", "case_001", "case_002", "case_003", "case_004"]
    assert report.loc["case_002", "status"] == "failed"
    err = report.loc["case_002", "error"]
    assert "case_002" in err and f"cannot read slices {SLICES - 2}-{SLICES - 1}" in err
    assert (report.loc[GOOD, "status"] == "done").all()
    assert (report.loc[GOOD, "slices"] == SLICES).all()
    for case_id in GOOD:
        conf = attrs[case_id]["confidence"]
        assert report.loc[case_id, "mean_router_confidence"] == pytest.approx(np.mean(conf),
                                                                             abs=1e-6)
        assert report.loc[case_id, "min_router_confidence"] == pytest.approx(np.min(conf),
                                                                            abs=1e-6)
        qc = attrs[case_id]["qc"]
        assert len(qc) == SLICES and set(attrs[case_id]["qc_components"]) >= {"stability",
                                                                             "reprompt"}
        assert report.loc[case_id, "qc"] == pytest.approx(case_qc(qc), abs=1e-6)
    import pandas as pd

    queue = pd.read_csv(out / "review_queue.csv")
    assert sorted(queue.case) == GOOD
    assert queue.qc.is_monotonic_increasing


def test_sigkill_then_resume_equals_uninterrupted_run(cohort_with_corrupt_case,
                                                     tiny_checkpoint_file, uninterrupted_run,
                                                     tmp_path, capsys):
    ckpt, cohort = tiny_checkpoint_file, cohort_with_corrupt_case
    ref_out = uninterrupted_run[0]
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "pipeline", *_args(cohort, out, ckpt)]
    done_before, killed = kill_after_first_case(cmd, out)
    assert 1 <= len(done_before) < len(GOOD), done_before  # killed part way
    rc = segmote_main(["batch", *_args(cohort, out, ckpt)])
    assert rc == 1  # only the corrupt case fails
    printed = capsys.readouterr().out
    assert f"review queue (lowest QC first): {out / 'review_queue.csv'}" in printed
    assert f"slice queue (worst slices across the cases first): {out / 'review_slices.csv'}" \
        in printed
    report = read_report(out).set_index("case")
    assert sorted(report.index[report.status == "skipped"]) == sorted(done_before)
    assert sorted(report.index[report.status == "done"]) == sorted(set(GOOD) - set(done_before))
    assert report.loc["case_002", "status"] == "failed"
    labels, ref_labels = labels_of(out), labels_of(ref_out)
    assert sorted(labels) == GOOD  # each case once, nothing else in the store
    attrs, ref_attrs = attrs_of(out), attrs_of(ref_out)
    for case_id in GOOD:
        np.testing.assert_array_equal(labels[case_id], ref_labels[case_id])
        assert attrs[case_id]["complete"] is True
        assert attrs[case_id]["signature_sha256"] == ref_attrs[case_id]["signature_sha256"]
        assert attrs[case_id]["expert"] == ref_attrs[case_id]["expert"]
        np.testing.assert_allclose(attrs[case_id]["confidence"],
                                   ref_attrs[case_id]["confidence"], atol=1e-6)
    assert not [p for p in killed if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
