"""Pipeline parts without Ray: case checks, boxes, the signed output store, the report and the
worker on the real tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pipeline.cases import CaseError, boxes_from_labels, iter_tasks, open_case, read_batch
from pipeline.report import (case_row, read_report, write_report, write_review_queue,
                             write_slice_queue)
from pipeline.store import OutputStore, OutputStoreMismatchError
from pipeline.worker import ModelSpec, SegmentWorker, SliceTask
from segmote_core.inference import segment_batch
from segmote_core.io import open_cohort
from tests.pipeline.helpers import make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    path = tmp_path_factory.mktemp("units") / "cohort.zarr"
    make_cohort(path, n_cases=3, slices=3, size=32, corrupt="case_001")
    root = zarr.open_group(str(path), mode="r+")
    bad = root.create_group("case_4d")
    bad.create_array("image", shape=(2, 2, 8, 8), dtype="int16", fill_value=0)
    return path


def test_boxes_from_labels():
    lab = np.zeros((3, 10, 12), np.uint8)
    lab[0, 2:5, 3:9] = 1
    lab[2, 7, 11] = 2
    boxes = boxes_from_labels(lab)
    np.testing.assert_array_equal(boxes[0], [3, 2, 8, 4])
    assert np.isnan(boxes[1]).all()
    np.testing.assert_array_equal(boxes[2], [11, 7, 11, 7])  # inclusive max, as SAM
    only2 = boxes_from_labels(lab, label_id=2)
    assert np.isnan(only2[0]).all() and only2[2].tolist() == [11, 7, 11, 7]


def test_case_checks_name_case_and_problem(cohort):
    coh = open_cohort(cohort)
    with pytest.raises(CaseError, match=r"case_4d/image: shape \(2, 2, 8, 8\) has 4 dim"):
        open_case(coh, "case_4d")
    case = open_case(coh, "case_001")
    assert case.shape == (3, 32, 32) and case.n_slices == 3
    slices, boxes = read_batch(case, 0, 2)  # slices 0-1 are intact
    assert slices.shape == (2, 32, 32) and boxes is None
    with pytest.raises(CaseError, match=r"case_001: cannot read slices 2-2"):
        list(iter_tasks(case, batch_size=2))
    with pytest.raises(CaseError, match="needs a 'nope' label array"):
        open_case(coh, "case_000", mode="box", label_key="nope")
    boxed = open_case(coh, "case_000", mode="box")
    tasks = list(iter_tasks(boxed, batch_size=2, label_value=3))
    assert [t.start for t in tasks] == [0, 2] and tasks[0].boxes.shape == (2, 4)
    truth = np.asarray(coh.case("case_000").labels[...])
    np.testing.assert_array_equal(np.concatenate([t.boxes for t in tasks]),
                                  boxes_from_labels(truth))


def test_store_resume_and_signature(tmp_path, cohort):
    out = tmp_path / "out.zarr"
    sig = {"model": {"weights_sha256": "a"}, "mode": "auto"}
    store = OutputStore(out, cohort, sig)
    store.begin("c1", (2, 4, 4))
    store.write("c1", 0, np.ones((2, 4, 4), np.uint8))
    assert not store.is_complete("c1")  # written but not signed complete
    store.finish("c1", np.array([0.5, np.nan]), np.array([1, -1]), {"slices": 2})
    assert store.is_complete("c1")
    attrs = store.case_attrs("c1")
    assert attrs["confidence"] == [0.5, None] and attrs["expert"] == [1, -1]
    store.begin("c2", (4, 4))  # left incomplete, as after a kill
    store.close()  # one writer per store: the next one opens after this one let go
    with OutputStore(out, cohort, sig) as again:
        assert again.is_complete("c1") and not again.is_complete("c2")
        again.begin("c2", (4, 4))  # redone from scratch, never appended to
        assert np.asarray(again.root["c2"]["labels"][...]).sum() == 0
    other = {"model": {"weights_sha256": "b"}, "mode": "auto"}
    with pytest.raises(OutputStoreMismatchError, match="--overwrite"):
        OutputStore(out, cohort, other)
    with OutputStore(out, cohort, sig) as same:
        assert same.is_complete("c1")  # refusal changed nothing
    with OutputStore(out, cohort, other, overwrite=True) as replaced:
        assert not replaced.is_complete("c1") and "c1" not in replaced.root
    with pytest.raises(ValueError, match="inside"):
        OutputStore(cohort / "labels.zarr", cohort, sig)


def test_report_and_review_queue(tmp_path):
    rows = [case_row("b", "done", slices=2, confidence=[0.2, 0.6], expert=[1, 1], labels="L",
                     qc=[0.9, 0.7]),
            case_row("a", "skipped", slices=4, confidence=[0.9, 0.7, 0.8, 0.8], expert=[0, 3],
                     qc=[0.2, 0.6, 0.9, None]),
            case_row("c", "failed", error="c: cannot read slices 1-1: corrupt"),
            case_row("d", "done", slices=1, confidence=[None], expert=[-1], qc=[None])]
    write_report(tmp_path, rows)
    df = read_report(tmp_path)
    assert df.case.tolist() == ["a", "b", "c", "d"]
    assert df.status.tolist() == ["skipped", "done", "failed", "done"]
    assert df.loc[2, "error"].startswith("c: cannot read")
    assert df.loc[1, "mean_router_confidence"] == pytest.approx(0.4)
    assert df.loc[0, "min_router_confidence"] == pytest.approx(0.7)
    # the case QC is the mean of its worst quarter of rated slices (here: one of three)
    assert df.loc[0, "qc"] == pytest.approx(0.2) and df.loc[1, "qc"] == pytest.approx(0.7)
    assert df.loc[0, "empty_slices"] == 1 and df.loc[0, "worst_slices"] == "0 1 2"
    assert json.loads(df.loc[0, "expert_usage"]) == {"0": 1, "3": 1}
    queue = write_review_queue(tmp_path, rows)
    import pandas as pd

    q = pd.read_csv(queue, keep_default_na=False)
    # nothing segmented first, then lowest QC first; the router confidence is not the order
    assert q.case.tolist() == ["d", "a", "b"]
    assert q.worst_slices.astype(str).tolist() == ["", "0 1 2", "1 0"]
    # the slice queue: every slice of the cohort, lowest QC first; the empty 2D case "d" first
    # (a likely miss), "a"'s empty last slice is the volume's end, not listed
    s = pd.read_csv(write_slice_queue(tmp_path, rows))
    assert list(zip(s.case, s.slice)) == [("d", 0), ("a", 0), ("a", 1), ("b", 1), ("a", 2),
                                          ("b", 0)]  # ties: case, then slice
    assert s["rank"].tolist() == list(range(1, 7)) and np.isnan(s.qc[0])
    assert s.qc[1:].tolist() == pytest.approx([0.2, 0.6, 0.7, 0.9, 0.9])


def test_slice_review_order_lists_gaps_not_volume_ends():
    from segmote_core.qc import slice_review_order

    order = slice_review_order({"v": [None, 0.8, None, 0.5, 0.9, None],
                                "w": [0.7], "x": [None, None], "y": []})
    # x: nothing segmented at all (both slices listed, first); v's slice 2 is a gap between
    # segmented slices (a likely miss); v's slices 0 and 5 lie beyond its segmented range
    assert [(c, z) for c, z, _ in order] == [("v", 2), ("x", 0), ("x", 1), ("v", 3), ("w", 0),
                                             ("v", 1), ("v", 4)]
    assert [v for _, _, v in order][3:] == [0.5, 0.7, 0.8, 0.9]


def test_worker_matches_segment_batch_and_reports_errors(tiny_checkpoint_file):
    ckpt = tiny_checkpoint_file
    worker = SegmentWorker(ModelSpec(str(ckpt)), threads=1)
    sig = worker.signature()
    assert len(sig["weights_sha256"]) == 64 and sig["bf16_encoder"] is False
    rng = np.random.default_rng(0)
    slices = rng.normal(0, 50, (3, 32, 32)).astype(np.int16)
    res = worker(SliceTask("c", 4, slices, "CT", None, 2))
    ref = segment_batch(worker.model, slices, "CT")
    assert res.error is None and res.start == 4
    np.testing.assert_array_equal(res.labels, ref.masks.astype(np.uint8) * 2)
    np.testing.assert_allclose(res.confidence, ref.confidence)
    assert set(np.unique(res.labels)) <= {0, 2}
    bad = worker(SliceTask("c", 0, np.zeros((2, 2, 8, 8), np.float32), "CT"))
    assert bad.labels is None and "slices 0-1" in bad.error and "(2, 2, 8, 8)" in bad.error
