"""`segmote batch` with the demo model on a real local Ray: the review queue puts the case with a
planted bad slice first and names that slice first; the QC lives beside the labels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline import BatchOptions, run_batch
from pipeline.report import read_report
from segmote_core.io import create_cohort, write_case
from segmote_core.qc import case_qc

BAD_CASE, BAD_SLICE = "brain_b", 3


@pytest.fixture(scope="module")
def planted_cohort(tmp_path_factory):
    from training.phantoms_brain import brain_patient, load_mni_template

    p = brain_patient(load_mni_template(), np.random.default_rng([3, 0, 1]))
    mid = len(p.image) // 2
    path = tmp_path_factory.mktemp("qc") / "cohort.zarr"
    create_cohort(path)
    for case_id, start in (("brain_a", mid - 10), (BAD_CASE, mid - 3), ("brain_c", mid + 4)):
        image = p.image[start:start + 6].copy()
        if case_id == BAD_CASE:
            ys, _ = np.nonzero(p.labels[start + BAD_SLICE])
            image[BAD_SLICE, ys.min():(ys.min() + ys.max()) // 2] = 0  # signal dropout band
        write_case(path, case_id, image, spacing=p.spacing, modality="MR_T1W",
                   labels=p.labels[start:start + 6], attrs={"dataset": "mni_brain"})
    return path


def test_review_queue_ranks_the_planted_bad_slice_first(planted_cohort, tmp_path):
    out = tmp_path / "labels.zarr"
    summary = run_batch(BatchOptions(str(planted_cohort), str(out), num_cpus=2, batch_size=4,
                                     progress=False))
    assert summary.ok, summary.rows
    queue = pd.read_csv(out / "review_queue.csv", keep_default_na=False)
    assert queue.case.tolist()[0] == BAD_CASE
    assert queue["rank"].tolist() == [1, 2, 3]
    assert int(str(queue.worst_slices[0]).split()[0]) == BAD_SLICE
    slices = pd.read_csv(out / "review_slices.csv")
    assert (slices.case[0], slices.slice[0]) == (BAD_CASE, BAD_SLICE)
    root = zarr.open_group(str(out), mode="r")
    report = read_report(out).set_index("case")
    for case_id in ("brain_a", BAD_CASE, "brain_c"):
        attrs = dict(root[case_id]["labels"].attrs)
        qc = attrs["qc"]
        assert len(qc) == 6 and all(v is None or 0 <= v <= 1 for v in qc)
        assert set(attrs["qc_components"]) == {"iou_head", "stability", "reprompt",
                                               "neighbours", "area"}
        assert all(len(v) == 6 for v in attrs["qc_components"].values())
        assert attrs["qc_case"] == pytest.approx(case_qc(qc), abs=1e-4)
        assert report.loc[case_id, "qc"] == pytest.approx(case_qc(qc), abs=1e-6)
        # the router confidence is kept, under its name, beside the QC
        conf = [c for c in attrs["confidence"] if c is not None]
        assert report.loc[case_id, "mean_router_confidence"] == pytest.approx(np.mean(conf))
    bad = dict(root[BAD_CASE]["labels"].attrs)["qc"]
    assert int(np.argmin([v if v is not None else math.inf for v in bad])) == BAD_SLICE
