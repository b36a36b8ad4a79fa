"""Hostile-but-fair inputs to ``segmote batch``: the output store never deletes or writes what it
did not create, inputs inside the output are refused, one writer per store, provenance of the
inputs, reserved and invalid case ids, missing chunks, unwritable outputs.

Most checks run before Ray starts (they are what makes a run refuse early), so they are fast;
the ones that need a real run use a local Ray with the tiny model.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import BatchOptions, ModelSpec, run_batch
from pipeline.store import OutputStore
from segmote_core.locking import StoreLock, lock_path
from tests.pipeline.support import REPO, make_cohort, subprocess_env

SIG = {"model": {"weights_sha256": "a"}, "mode": "auto"}
OTHER = {"model": {"weights_sha256": "b"}, "mode": "auto"}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


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
    before = _digest(inner)
    r = _batch(str(inner), str(out), "--overwrite")
    assert r.returncode == 2, r.stderr
    assert "lies inside the output" in r.stderr and str(inner) in r.stderr
    assert _digest(inner) == before


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
