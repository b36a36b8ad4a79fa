"""Hostile-but-fair inputs to ``segmote batch``: the output store never deletes or writes what it
did not create, inputs inside the output are refused, one writer per store, provenance of the
inputs, reserved and invalid case ids, missing chunks, unwritable outputs.

Most checks run before Ray starts (they are what makes a run refuse early), so they are fast;
the ones that need a real run use a local Ray with the tiny model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.store import OutputStore
from segmote_core.locking import StoreLock, lock_path
from tests.pipeline.helpers import REPO, make_cohort, subprocess_env, tree_digest

SIG = {"model": {"weights_sha256": "a"}, "mode": "auto"}
OTHER = {"model": {"weights_sha256": "b"}, "mode": "auto"}



def _batch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env=subprocess_env(),
                          timeout=timeout)


@pytest.fixture
def cohort(tmp_path):
    path = tmp_path / "cohort.zarr"
    make_cohort(path, n_cases=2, slices=2, size=16, corrupt=None)
    return path


# ------------------------------------------------------------ an input inside the output
def test_overwrite_never_deletes_a_cohort_inside_the_output(tmp_path):
    """`segmote batch out.zarr/cohort_in.zarr out.zarr --overwrite`: refused (exit 2) before
    anything is touched; the cohort is byte for byte what it was."""
    out = tmp_path / "out.zarr"
    with OutputStore(out, tmp_path / "elsewhere.zarr", SIG) as store:  # a real labels store
        store.begin("x", (2, 4, 4))
    inner = out / "cohort_in.zarr"
    make_cohort(inner, n_cases=2, slices=2, size=16, corrupt=None)
    before = tree_digest(inner)
    r = _batch(str(inner), str(out), "--overwrite")
    assert r.returncode == 2, r.stderr
    assert "lies inside the output" in r.stderr and str(inner) in r.stderr
    assert tree_digest(inner) == before


def test_input_reached_through_a_symlink_is_found_inside_the_output(tmp_path):
    out = tmp_path / "out.zarr"
    with OutputStore(out, tmp_path / "elsewhere.zarr", SIG):
        pass
    make_cohort(out / "cohort_in.zarr", n_cases=1, slices=2, size=16, corrupt=None)
    link = tmp_path / "looks_outside.zarr"
    link.symlink_to(out / "cohort_in.zarr")
    with pytest.raises(ValueError, match="lies inside the output"):
        OutputStore.precheck(out, link)
    ckpt = out / "model.safetensors"  # a model file kept inside the output
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match="input .*model.safetensors lies inside the output"):
        OutputStore.precheck(out, tmp_path / "c.zarr", [str(ckpt)])


def test_overwrite_deletes_only_case_groups_the_store_wrote(tmp_path, cohort):
    """Another model's cases go on --overwrite; a user's own group in the folder (not written
    by the store) stays, and a case id colliding with it fails that case, touching nothing."""
    out = tmp_path / "out.zarr"
    with OutputStore(out, cohort, OTHER) as store:
        store.begin("case_000", (2, 4, 4))
        store.finish("case_000", np.ones(2), np.zeros(2), {})
    root = zarr.open_group(str(out), mode="r+")
    mine = root.create_group("case_001")  # the user's, not the store's: an extra array
    mine.create_array("notes", shape=(3,), dtype="int8", fill_value=7)
    with OutputStore(out, cohort, SIG, overwrite=True) as store:
        assert "case_000" not in store.root and not store.owns("case_001")
        assert np.asarray(store.root["case_001"]["notes"][...]).tolist() == [7, 7, 7]
        with pytest.raises(RuntimeError, match="was not written by segmote batch"):
            store.begin("case_001", (2, 4, 4))
        store.discard("case_001")
        assert "case_001" in store.root


# ------------------------------------------------------------ one writer per store
def test_second_writer_is_refused_naming_the_holder(tmp_path, cohort):
    out = tmp_path / "out.zarr"
    with StoreLock(out, "segmote batch"):
        r = _batch(str(cohort), str(out))
        assert r.returncode == 2, r.stderr
        assert f"pid {os.getpid()}" in r.stderr and "segmote batch" in r.stderr
        with pytest.raises(RuntimeError, match="already being written by this process"):
            OutputStore(out, cohort, SIG)  # interleaved writers in one process: refused too
    assert not lock_path(out).exists()


def test_stale_lock_of_a_killed_run_is_explained_and_taken(tmp_path, cohort, caplog):
    out = tmp_path / "out.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(
        f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}, "purpose": "segmote batch"}}')
    with OutputStore(out, cohort, SIG) as store:
        assert store.lock.held
    assert f"stale lock of segmote batch (pid {dead.pid}" in caplog.text


# ------------------------------------------------------------ a real run: inputs as they are
def _immutable(path: Path, on: bool) -> bool:
    """``chattr +i``: the one way to make a folder unwritable even for root (tests run as root
    in CI containers, where chmod does not stop writes)."""
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_checkpoint_file):
    """One cohort with every kind of trouble, segmented twice on a local Ray (tiny model)."""
    from segmote_core.io import write_case

    work = tmp_path_factory.mktemp("hostile")
    ckpt = tiny_checkpoint_file
    cohort = work / "cohort.zarr"
    make_cohort(cohort, n_cases=3, slices=3, size=16, corrupt=None)
    (cohort / "case_002" / "image" / "c" / "1" / "0" / "0").unlink()      # a lost chunk
    nan = np.full((3, 16, 16), 5.0, np.float32)
    nan[:, 4:10, 4:10] = 80.0
    nan[1] = np.nan                                                       # one slice of NaN
    write_case(cohort, "case_nan", nan, modality="CT")
    other = zarr.open_group(str(cohort), mode="r+").create_group("report.parquet")
    other.create_array("image", data=np.zeros((3, 16, 16), np.int16))   # another tool's case
    out = work / "out.zarr"
    args = [str(cohort), str(out), "--segmote-checkpoint", str(ckpt), "--num-cpus", "2"]
    first = _batch(*args)
    first_rows = _report(out)
    stamp = dict(zarr.open_group(str(out), mode="r")["case_000"]["labels"].attrs)
    vol = np.full((3, 16, 16), -80, np.int16)
    vol[:, 2:14, 2:14] = 60
    write_case(cohort, "case_000", vol, spacing=(2.0, 1.0, 1.0), modality="CT")  # rewritten
    sig = dict(zarr.open_group(str(out), mode="r").attrs)["signature"]
    with OutputStore(out, cohort, sig) as store:       # a partial case that cannot be removed
        store.begin("case_002", (3, 16, 16))
    locked = _immutable(out / "case_002", True)
    try:
        second = _batch(*args)
    finally:
        if locked:
            _immutable(out / "case_002", False)
    return {"cohort": cohort, "out": out, "first": first, "second": second, "stamp": stamp,
            "first_rows": first_rows,
            "locked": locked, "args": args}


def _report(out: Path) -> dict[str, dict]:
    from pipeline.report import read_report

    return {r["case"]: r for r in read_report(out).to_dict("records")}


def test_bad_cases_fail_alone_and_the_report_is_written(hostile_run):
    """A reserved case id crashed the run at its end with no report; a deleted chunk was read as
    zeros and reported done. Now each fails its own row, the others complete, exit 1."""
    r, out = hostile_run["first"], hostile_run["out"]
    assert r.returncode == 1, r.stderr
    rows = hostile_run["first_rows"]
    assert rows["case_000"]["status"] == rows["case_001"]["status"] == "done"
    assert rows["report.parquet"]["status"] == "failed"
    assert "reserved" in rows["report.parquet"]["error"]
    assert rows["case_002"]["status"] == "failed"
    assert "case_002/image: the chunk of slice(s) 1 is missing" in rows["case_002"]["error"]
    assert (out / "report.parquet").is_file() and (out / "review_queue.csv").is_file()


def test_an_all_nan_slice_is_left_empty_and_the_others_segmented(hostile_run):
    out = hostile_run["out"]
    assert hostile_run["first_rows"]["case_nan"]["status"] == "done"
    arr = zarr.open_group(str(out), mode="r")["case_nan"]["labels"]
    assert not np.asarray(arr[1]).any()
    assert arr.attrs["confidence"][1] is None and arr.attrs["expert"][1] == -1
    assert arr.attrs["confidence"][0] is not None


def test_a_rewritten_input_case_is_segmented_again_and_reported(hostile_run):
    """A cohort case rewritten after its labels were made kept its old labels on rerun (the
    signature covered the model only). Now its input signature differs: redone, reported."""
    r, out = hostile_run["second"], hostile_run["out"]
    rows = _report(out)
    assert rows["case_000"]["status"] == "done" and "input changed" in rows["case_000"]["note"]
    assert rows["case_001"]["status"] == "skipped" and not rows["case_001"]["note"]
    assert "CHANGED case_000" in r.stdout
    new = dict(zarr.open_group(str(out), mode="r")["case_000"]["labels"].attrs)
    assert new["input_signature"] != hostile_run["stamp"]["input_signature"]
    assert new["input_signature"]["write_stamp"] == zarr.open_group(
        str(hostile_run["cohort"]), mode="r")["case_000"].attrs["write_stamp"]


def test_an_os_error_fails_its_case_with_the_error_named(hostile_run):
    if not hostile_run["locked"]:
        pytest.skip("chattr +i is not available here")
    r, out = hostile_run["second"], hostile_run["out"]
    assert r.returncode == 1
    rows = _report(out)
    assert rows["case_002"]["status"] == "failed"
    assert "Operation not permitted" in rows["case_002"]["error"]
    assert rows["case_nan"]["status"] == "skipped"


def test_unwritable_output_exits_2_before_ray_starts(hostile_run, tmp_path):
    out = tmp_path / "out.zarr"
    with OutputStore(out, tmp_path / "c.zarr", SIG):  # an existing (empty) labels store
        pass
    if not _immutable(out, True):
        pytest.skip("chattr +i is not available here")
    try:
        r = _batch(*[a if a != str(hostile_run["out"]) else str(out)
                     for a in hostile_run["args"]], timeout=120)
    finally:
        _immutable(out, False)
    assert r.returncode == 2, r.stderr
    assert f"cannot write to {out}" in r.stderr and "Operation not permitted" in r.stderr
    assert "actor" not in r.stderr.lower() and "ray" not in r.stderr.lower()


def test_a_report_that_cannot_be_written_is_said_plainly(tmp_path):
    from pipeline.runner import BatchSummary, write_outputs
    from pipeline.report import case_row

    out = tmp_path / "out.zarr"
    out.mkdir()
    if not _immutable(out, True):
        pytest.skip("chattr +i is not available here")
    try:
        summary = BatchSummary(rows=[case_row("a", "done", slices=1)])
        write_outputs(out, summary)
    finally:
        _immutable(out, False)
    assert not summary.ok and summary.report == ""
    assert "Operation not permitted" in summary.report_error
    assert "rerun the same command" in summary.report_error


def test_untrained_model_in_auto_mode_exits_2_before_ray_saying_what_to_do(tmp_path, cohort):
    """`segmote batch COHORT OUT --sam-checkpoint sam.pth` ran PPT with random queries: an
    X-ray came back 'done', half labelled, exit 0. Now: exit 2 before Ray starts, saying to use
    --mode box or to train first (docs/training.md)."""
    import torch

    from segmote_core import SegMoTEConfig
    from segmote_core.build import build_sam

    torch.save(build_sam(SegMoTEConfig(model_type="tiny")).state_dict(), tmp_path / "sam.pth")
    r = _batch(str(cohort), str(tmp_path / "out.zarr"), "--sam-checkpoint",
               str(tmp_path / "sam.pth"), "--model-type", "tiny", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--mode box" in r.stderr and "docs/training.md" in r.stderr
    assert "ray" not in r.stderr.lower() and not (tmp_path / "out.zarr").exists()
