"""Acceptance 3: join a cluster started with ``ray start --head`` through ``--address``.

The head runs with its own ``--temp-dir`` (so nobody else's ``ray.init()`` on this machine joins
it by accident) and is torn down by process id, not with ``ray stop``, which would also stop
every other Ray on a shared machine. The same cluster also checks that a changed model refuses
to mix with old labels unless ``--overwrite``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.report import read_report
from tests.pipeline.helpers import (REPO, attrs_of, labels_of, make_cohort, subprocess_env,
                                   tiny_checkpoint)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head --port P --num-cpus 2 --block``; yields ``127.0.0.1:P``."""
    port = _free_port()
    temp_dir = Path(f"/tmp/rp5_{port}")
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--temp-dir", str(temp_dir), "--block"],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    proc = psutil.Process(head.pid)
    family: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, head.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "ray start --head did not come up in 120 s"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        time.sleep(2)  # raylet registers after the GCS port opens
        yield f"127.0.0.1:{port}", proc, family
    finally:
        for p in [proc, *proc.children(recursive=True)]:
            family[p.pid] = p
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        psutil.wait_procs(list(family.values()), timeout=30)
        for p in family.values():  # and anything that did not, by pid
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(family.values()), timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--no-progress"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # a second Ray head and a joining driver: ~100 s on 2 cores; runs in CI after the default run
def test_join_cluster_with_address_and_refuse_other_model(tmp_path, ray_head):
    address, head, family = ray_head
    ckpt_a = tiny_checkpoint(tmp_path / "a.safetensors", seed=0)
    ckpt_b = tiny_checkpoint(tmp_path / "b.safetensors", seed=1)
    cohort, out = tmp_path / "cohort.zarr", tmp_path / "labels.zarr"
    ids = make_cohort(cohort, n_cases=3, slices=2, size=32, corrupt=None)
    base = [str(cohort), str(out), "--address", address, "--batch-size", "2"]

    first = _run(base + ["--segmote-checkpoint", str(ckpt_a)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 segmented, 0 already complete, 0 failed" in first.stdout
    # the actors ran in the head's raylet, not in a Ray of the driver's own
    for p in head.children(recursive=True):
        family[p.pid] = p
    labels_a, attrs_a = labels_of(out), attrs_of(out)
    assert sorted(labels_a) == ids and all(a["complete"] for a in attrs_a.values())
    sig_a = {a["signature_sha256"] for a in attrs_a.values()}
    assert len(sig_a) == 1

    refused = _run(base + ["--segmote-checkpoint", str(ckpt_b)])
    assert refused.returncode == 2
    assert "another model/configuration" in refused.stderr and "--overwrite" in refused.stderr
    assert {a["signature_sha256"] for a in attrs_of(out).values()} == sig_a  # untouched

    again = _run(base + ["--segmote-checkpoint", str(ckpt_a)])  # resume: nothing to do
    assert again.returncode == 0 and "0 segmented, 3 already complete" in again.stdout

    replaced = _run(base + ["--segmote-checkpoint", str(ckpt_b), "--overwrite"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    attrs_b = attrs_of(out)
    sig_b = {a["signature_sha256"] for a in attrs_b.values()}
    assert len(sig_b) == 1 and sig_b != sig_a
    assert (read_report(out).status == "done").all()
    # other weights, other router confidences
    assert not np.allclose(attrs_b[ids[0]]["confidence"], attrs_a[ids[0]]["confidence"])

    # box mode: one box per slice around an existing label array, written as --label-id
    import zarr

    from segmote_core.build import load_segmote
    from segmote_core.inference import segment_batch

    manual = np.zeros((2, 32, 32), np.uint8)
    manual[1, 8:20, 10:26] = 3  # slice 0 has no label: no box, stays empty
    zarr.open_group(str(cohort / ids[0]), mode="r+").create_array(
        "manual", data=manual, chunks=(1, 32, 32))
    box_out = tmp_path / "boxes.zarr"
    boxed = _run([str(cohort), str(box_out), "--address", address, "--mode", "box",
                  "--label-key", "manual", "--label-id", "3", "--cases", ids[0],
                  "--segmote-checkpoint", str(ckpt_a)])
    assert boxed.returncode == 0, boxed.stderr[-3000:]
    lab, at = labels_of(box_out)[ids[0]], attrs_of(box_out)[ids[0]]
    assert at["signature"]["mode"] == "box" and at["signature"]["label_key"] == "manual"
    assert not lab[0].any() and at["confidence"][0] is None and at["expert"][0] == -1
    image = np.asarray(zarr.open_group(str(cohort), mode="r")[f"{ids[0]}/image"][1:2])
    # the label spans rows 8-19, columns 10-25: the box is inclusive (x0, y0, x1, y1), as SAM's
    ref = segment_batch(load_segmote(ckpt_a), image, "CT", boxes=np.array([[10, 8, 25, 19]]))
    np.testing.assert_array_equal(lab[1], ref.masks[0].astype(np.uint8) * 3)
    assert at["confidence"][1] == pytest.approx(float(ref.confidence[0]), abs=1e-5)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(ckpt_a.read_bytes()[:1000])  # truncated checkpoint
    bad = _run(base + ["--segmote-checkpoint", str(broken), "--overwrite"])
    assert bad.returncode == 2 and "could not load the model" in bad.stderr
    assert "broken.safetensors" in bad.stderr
    assert {a["signature_sha256"] for a in attrs_of(out).values()} == sig_b  # untouched
