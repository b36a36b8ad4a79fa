"""Helpers of the pipeline tests (no tests or fixtures here; those are in conftest.py): a real tiny
SegMoTE checkpoint and a small cohort on disk, one of whose cases can be made corrupt."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from segmote_core import SegMoTEConfig, build_segmote, save_segmote
from pipeline.synthetic import synthetic_cohort

REPO = Path(__file__).resolve().parents[2]


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """The real tiny SegMoTE (random weights, 128 px input for speed) saved with the core's
    ``save_segmote``, recorded as trained; the router gate is randomised so confidence and
    experts vary by slice."""
    torch.manual_seed(seed)
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=128))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("w_gate"):
                p.normal_(0.0, 0.1)
    # recorded as trained: these random weights stand in for a trained model (an untrained
    # checkpoint is refused for prompt-free segmentation)
    return save_segmote(model, path, training={"note": "random weights standing in for a "
                                                       "trained model (tests)"})


def corrupt_chunk(cohort: Path, case_id: str, z: int) -> Path:
    """Overwrite slice ``z``'s chunk of ``case_id``'s image with garbage bytes."""
    chunk = cohort / case_id / "image" / "c" / str(z) / "0" / "0"
    if not chunk.is_file():
        raise FileNotFoundError(chunk)
    chunk.write_bytes(b"\x00garbage, not zstd" * 3)
    return chunk


def make_cohort(path: Path, n_cases: int = 5, slices: int = 2, size: int = 32,
                corrupt: str | None = "case_002") -> list[str]:
    ids = synthetic_cohort(path, n_cases, slices, size, seed=1)
    if corrupt:
        corrupt_chunk(path, corrupt, slices - 1)
    return ids


def labels_of(out: Path) -> dict[str, np.ndarray]:
    import zarr

    root = zarr.open_group(str(out), mode="r")
    return {name: np.asarray(g["labels"][...]) for name, g in root.groups()}


def attrs_of(out: Path) -> dict[str, dict]:
    import zarr

    root = zarr.open_group(str(out), mode="r")
    return {name: dict(g["labels"].attrs) for name, g in root.groups()}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tree_digest(path: Path) -> str:
    """sha256 over every file below ``path`` (relative names and bytes): equal means untouched."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def complete_cases(out: Path) -> list[str]:
    """Cases of the output store ``out`` whose ``complete`` flag is set (none while it is being
    created)."""
    import zarr

    if not (out / "zarr.json").exists():
        return []
    try:
        root = zarr.open_group(str(out), mode="r")
        return [n for n, g in root.groups()
                if "labels" in g and g["labels"].attrs.get("complete") is True]
    except Exception:  # a metadata file being written right now
        return []


def kill_after_first_case(cmd: list[str], out: Path, timeout: float = 240
                          ) -> tuple[list[str], list]:
    """Run ``cmd`` (a ``segmote batch`` driver) in a subprocess and SIGKILL it, with Ray's
    processes it started, as soon as one case of ``out`` is complete. Returns the cases complete
    then and the processes killed (to check that none survived)."""
    import signal
    import subprocess
    import time

    import psutil

    driver = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    proc = psutil.Process(driver.pid)
    children: list = []
    try:
        deadline = time.monotonic() + timeout
        while not complete_cases(out):
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"no case completed within {timeout:.0f} s"
            children = proc.children(recursive=True) or children
            time.sleep(0.02)
        children = proc.children(recursive=True) or children
        driver.send_signal(signal.SIGKILL)
    finally:
        for p in [proc, *children]:  # Ray's own processes of the killed driver, by pid
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs([proc, *children], timeout=20)
    return complete_cases(out), [proc, *children]
