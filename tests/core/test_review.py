"""The corrections store: a save killed at any moment (SIGKILL of the process doing it) leaves
the old correction or the new one, never a torn one; errors name the case."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from segmote_core.review import OutputStoreError, open_output, read_correction, save_correction

SHAPE = (24, 128, 128)

_SAVER = """
import sys, numpy as np
from segmote_core.review import save_correction
out = sys.argv[1]
i = 0
while True:
    i += 1
    data = np.random.default_rng(i % 2).integers(0, 4, {shape}, dtype=np.uint8)
    save_correction(out, "case", data)
    print(i % 2, flush=True)
"""


def _store(tmp_path):
    """A minimal output store by its documented format (kind labels, a complete case)."""
    cohort = tmp_path / "cohort.zarr"
    from segmote_core.io import create_cohort, write_case

    create_cohort(cohort)
    write_case(cohort, "case", np.zeros(SHAPE, np.int16))
    out = tmp_path / "out.zarr"
    root = zarr.open_group(str(out), mode="w")
    root.attrs.update({"segmote": {"kind": "labels", "version": 1}, "cohort": str(cohort),
                       "signature_sha256": "abc"})
    arr = root.create_group("case").create_array("labels", shape=SHAPE, dtype="uint8",
                                                 chunks=(1, *SHAPE[1:]))
    arr.attrs.update({"signature_sha256": "abc", "complete": True})
    inc = root.create_group("half").create_array("labels", shape=SHAPE, dtype="uint8")
    inc.attrs.update({"complete": False})
    return out


def test_killed_saves_leave_old_or_new_never_torn(tmp_path):
    out = _store(tmp_path)
    versions = [np.random.default_rng(k).integers(0, 4, SHAPE, dtype=np.uint8) for k in (0, 1)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    rng = np.random.default_rng(7)
    seen = set()
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER.format(shape=SHAPE), str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdout.readline()  # at least one save completed
        time.sleep(float(rng.uniform(0.0, 0.6)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        got = read_correction(out, "case")
        assert got is not None, f"trial {trial}: the correction vanished"
        labels, attrs = got
        match = [k for k, v in enumerate(versions) if np.array_equal(labels, v)]
        assert match, f"trial {trial}: a torn correction"
        assert attrs["complete"] is True and attrs["reviewed"] is True
        seen.add(match[0])
    # a later save (the stale lock of the killed process is taken over) still works
    save_correction(out, "case", versions[0])
    assert np.array_equal(read_correction(out, "case")[0], versions[0])
    assert not list((out / "corrections").glob(".case.*"))


def test_errors_name_the_case(tmp_path):
    out = _store(tmp_path)
    with pytest.raises(OutputStoreError, match="half.*incomplete"):
        save_correction(out, "half", np.zeros(SHAPE, np.uint8))
    with pytest.raises(OutputStoreError, match="do not match"):
        save_correction(out, "case", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(OutputStoreError, match="not an output store"):
        open_output(tmp_path / "cohort.zarr")
    assert read_correction(out, "case") is None


def test_corrections_in_a_folder_of_ones_choice(tmp_path):
    from segmote_core.export import export_store

    out = _store(tmp_path)
    mine = tmp_path / "my_corrections"
    data = np.random.default_rng(3).integers(0, 3, SHAPE, dtype=np.uint8)
    save_correction(open_output(out, mine), "case", data)
    assert (mine / "case").is_dir() and not (out / "corrections").exists()
    assert read_correction(out, "case") is None
    assert np.array_equal(read_correction(open_output(out, mine), "case")[0], data)
    res = export_store(out, tmp_path / "export", corrections=mine, cases=["case"])
    assert res.ok and res.sources == {"case": "reviewed"}
