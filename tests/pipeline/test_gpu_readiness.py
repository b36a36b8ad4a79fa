"""The cluster run's GPU-path guards, shown on a CPU machine with a real local Ray.

A pool Ray can never place is refused at once (exit 2, what does not fit named); a GPU actor
whose torch has no CUDA fails loudly instead of running on one CPU thread; actors that differ
in precision or device are refused; an actor whose device is poisoned (CUDA illegal memory
access, injected by the documented test hook) is replaced and the other cases complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.engine import PoolConfig, PoolFitError, check_fit
from pipeline.worker import ModelSpec, NoCudaError, SegmentWorker, SliceTask
from tests.pipeline.helpers import REPO, attrs_of, labels_of, make_cohort, subprocess_env


@pytest.fixture(scope="module")
def three_case_cohort(tmp_path_factory) -> Path:
    """Three clean cases of two 32 x 32 slices."""
    cohort = tmp_path_factory.mktemp("gpu_ready") / "cohort.zarr"
    make_cohort(cohort, n_cases=3, slices=2, size=32, corrupt=None)
    return cohort


def _batch(*args: str, env: dict | None = None, timeout: int = 240):
    return subprocess.run([sys.executable, "-m", "pipeline", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**subprocess_env(), **(env or {})})


# ----------------------------------------------------------------------------- pool fit
def test_check_fit_names_what_does_not_fit():
    with pytest.raises(PoolFitError, match=r"2 actors x 1 CPU = 2 CPUs, the cluster has 1"):
        check_fit(PoolConfig(2, 0.0, 1.0), {"CPU": 1.0})
    with pytest.raises(PoolFitError, match=r"4 actors x 1 GPU = 4 GPUs, the cluster has 2"):
        check_fit(PoolConfig(4, 1.0, 1.0), {"CPU": 64.0, "GPU": 2.0})
    # totals fit, but no single node has 2 GPUs
    nodes = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}]
    with pytest.raises(PoolFitError, match=r"fits on no node"):
        check_fit(PoolConfig(1, 2.0, 1.0), {"CPU": 32.0, "GPU": 2.0}, nodes)
    # totals fit, but 3 actors of 5 CPU cannot be packed on two 8-CPU nodes
    with pytest.raises(PoolFitError, match=r"hold only 2"):
        check_fit(PoolConfig(3, 0.0, 5.0), {"CPU": 16.0}, [{"CPU": 8.0}, {"CPU": 8.0}])
    check_fit(PoolConfig(2, 0.5, 1.0), {"CPU": 4.0, "GPU": 1.0}, [{"CPU": 4.0, "GPU": 1.0}])
    check_fit(PoolConfig(2, 0.0, 4.0), {"CPU": 8.0}, [{"CPU": 4.0}, {"CPU": 4.0}])


def test_two_one_cpu_actors_on_a_one_cpu_ray_are_refused_at_once(tiny_checkpoint_file,
                                                                  three_case_cohort, tmp_path):
    """Before: the second actor never started and the run waited forever."""
    ckpt, cohort = tiny_checkpoint_file, three_case_cohort
    out = tmp_path / "out.zarr"
    t0 = time.perf_counter()
    proc = _batch(str(cohort), str(out), "--segmote-checkpoint", str(ckpt), "--num-cpus", "1",
                  "--num-actors", "2", "--cpus-per-actor", "1", "--no-progress", timeout=120)
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert "2 actors x 1 CPU = 2 CPUs, the cluster has 1" in proc.stderr
    assert took < 60
    assert not any(labels_of(out)) if out.exists() else True


# ----------------------------------------------------------------------------- signatures
def test_gpu_worker_without_cuda_fails_loudly(tiny_checkpoint_file):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ckpt = tiny_checkpoint_file
    with pytest.raises(NoCudaError, match="cannot use CUDA.*--gpus-per-actor 0"):
        SegmentWorker(ModelSpec(str(ckpt)), use_gpu=True)


def test_gpu_actor_without_cuda_stops_the_run_on_the_driver(tiny_checkpoint_file):
    """A local Ray that advertises a GPU the actor's torch cannot use: the load error reaches
    the driver (ModelLoadError, exit 2), not a log line on the worker."""
    import ray
    import torch

    from pipeline.engine import ActorPool, ModelLoadError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ckpt = tiny_checkpoint_file
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False,
             log_to_driver=False)
    try:
        pool = ActorPool(ModelSpec(str(ckpt)), PoolConfig(1, 1.0, 1.0))
        with pytest.raises(ModelLoadError, match="cannot use CUDA"):
            pool.signature(timeout=120)
    finally:
        ray.shutdown()


def test_signature_carries_device_and_precision(tiny_checkpoint_file):
    ckpt = tiny_checkpoint_file
    sig = SegmentWorker(ModelSpec(str(ckpt), precision="bf16")).signature()
    assert sig["device"] == "cpu" and sig["bf16_encoder"] is True
    assert SegmentWorker(ModelSpec(str(ckpt), precision="fp32")).signature()["bf16_encoder"] \
        is False


def test_actors_of_different_precision_are_refused(tiny_checkpoint_file):
    """Two actors whose signatures differ (here: one bf16, one fp32, as on a cluster whose
    nodes differ) must not write one store under one signature."""
    import ray

    from pipeline.engine import ActorPool, ModelLoadError

    ckpt = tiny_checkpoint_file
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = ActorPool(ModelSpec(str(ckpt), precision="fp32"), PoolConfig(1, 0.0, 1.0))
        # a second actor that loads in bf16 beside it (each takes 1 of the 2 CPUs; killing and
        # replacing an actor instead raced Ray's release of its CPU: CI once waited 120 s)
        pool.spec = ModelSpec(str(ckpt), precision="bf16")
        pool.actors.append(pool._new_actor())
        assert len(pool.actors) == 2
        with pytest.raises(ModelLoadError, match="bf16_encoder"):
            pool.signature(timeout=120)
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- poisoning
def test_poisoned_worker_fails_every_later_call(tiny_checkpoint_file):
    from pipeline.worker import WorkerPoisonedError

    ckpt = tiny_checkpoint_file
    w = SegmentWorker(ModelSpec(str(ckpt)), poison_case="bad")
    img = np.random.default_rng(0).normal(size=(1, 32, 32)).astype(np.float32)
    assert w(SliceTask("ok", 0, img, "CT")).error is None
    with pytest.raises(WorkerPoisonedError, match="illegal memory access"):
        w(SliceTask("bad", 0, img, "CT"))
    with pytest.raises(WorkerPoisonedError):
        w(SliceTask("ok", 0, img, "CT"))


@pytest.mark.slow  # an actor killed and replaced mid-run: ~60 s on 2 cores; runs in CI after the default run
def test_poisoned_actor_is_replaced_and_the_other_cases_complete(tiny_checkpoint_file,
                                                                 three_case_cohort, tmp_path):
    """One actor; case_001's batch poisons it. Before: every later batch on it failed too.
    Now the actor is replaced: case_001 fails, naming the error; case_000 and case_002 are
    complete and equal to a clean run's labels."""
    ckpt, cohort = tiny_checkpoint_file, three_case_cohort
    args = ["--segmote-checkpoint", str(ckpt), "--num-cpus", "1", "--num-actors", "1",
            "--batch-size", "1", "--no-progress"]
    clean = tmp_path / "clean.zarr"
    assert _batch(str(cohort), str(clean), *args).returncode == 0
    out = tmp_path / "out.zarr"
    proc = _batch(str(cohort), str(out), *args, env={"SEGMOTE_TEST_POISON_CASE": "case_001"})
    assert proc.returncode == 1, proc.stderr
    assert "FAILED case_001" in proc.stdout and "illegal memory access" in proc.stdout
    assert "actor was replaced" in proc.stdout
    attrs = attrs_of(out)
    done = sorted(c for c, a in attrs.items() if a.get("complete"))
    assert done == ["case_000", "case_002"], attrs
    got, want = labels_of(out), labels_of(clean)
    for case in done:
        np.testing.assert_array_equal(got[case], want[case])


# ----------------------------------------------------------------------------- gpu_check.sh
def test_gpu_check_says_plainly_that_there_is_no_gpu_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run benchmarks/gpu_check.sh itself")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 3
    assert "no CUDA GPU visible" in proc.stderr and "NVIDIA GPU" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 3 and "no CUDA device" in proc.stderr


def test_gpu_check_peak_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A10G") == 70.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("Tesla T4") is None  # no bf16 tensor cores
