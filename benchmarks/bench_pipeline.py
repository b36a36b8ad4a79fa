"""Batch pipeline vs a plain in-process loop over the model, same cohort, same run.

    python benchmarks/bench_pipeline.py [--cases 5 20] [--slices 6] [--threads 2]

1. Throughput on the largest cohort: the bare loop (the same job as a pipeline worker and
   driver: ``segment_with_qc`` over every case, i.e. the masks and the QC signals, then the
   case's QC attrs, reading the zarr input and writing zarr labels, one process,
   ``--threads`` torch threads) against
   ``segmote batch`` on a local Ray (one actor with the same threads, same batch size). Both are
   reported with and without start-up (bare: model load; pipeline: Ray + actor + model load).
   Target: pipeline >= 0.85x of the bare loop.
2. Peak memory of the pipeline for each cohort size: the driver's and every actor's peak RSS
   (``ru_maxrss``), and the sampled peak RSS of the driver's whole process tree (Ray's GCS,
   raylet and workers included). Target: largest within 1.2x of the smallest.

The model is the real tiny SegMoTE (random weights, ``--image-size`` input); each pipeline run
is a child process so its memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_model(path: Path, image_size: int) -> Path:
    import torch

    from segmote_core import SegMoTEConfig, build_segmote, save_segmote

    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=image_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("w_gate"):
                p.normal_(0.0, 0.1)
    # recorded as trained: random weights stand in for a trained model (timing only)
    return save_segmote(model, path, trained=("experts", "ppt"))


def bare_loop(cohort: Path, out: Path, ckpt: Path, batch_size: int, threads: int) -> dict:
    """The reference: one process, the model loaded once, every case in turn."""
    import torch
    import zarr

    from segmote_core.build import load_segmote
    from segmote_core.io import open_cohort
    from segmote_core.qc import qc_attrs, segment_with_qc

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_segmote(ckpt)
    t_load = time.perf_counter() - t0
    coh = open_cohort(cohort)
    root = zarr.open_group(str(out), mode="w")
    slices = 0
    for case_id in coh.case_ids():
        image = coh.case(case_id).image
        labels = root.create_group(case_id).create_array(
            "labels", shape=image.shape, dtype="uint8", chunks=(1, *image.shape[1:]))
        conf, signals, masks = [], [], []
        for z in range(0, image.shape[0], batch_size):
            res, sig = segment_with_qc(model, np.asarray(image[z:z + batch_size]), "CT")
            labels[z:z + len(res.masks)] = res.masks.astype(np.uint8)
            conf += res.confidence.tolist()
            signals.append(sig.as_dict())
            masks.append(res.masks)
            slices += len(res.masks)
        sig = {k: np.concatenate([s[k] for s in signals]) for k in signals[0]}
        every = np.concatenate(masks)
        labels.attrs.update({"confidence": conf, **qc_attrs(sig, lambda z: every[z]),
                             "complete": True})
    total = time.perf_counter() - t0
    return {"slices": slices, "seconds": total, "load_seconds": t_load}


def child(args: argparse.Namespace) -> None:
    """One pipeline run; prints its summary as JSON on the last line."""
    import logging

    from pipeline import BatchOptions, ModelSpec, PoolConfig, run_batch

    logging.basicConfig(level=logging.WARNING)
    opts = BatchOptions(args.child[0], args.child[1], ModelSpec(args.child[2]),
                        batch_size=args.batch_size, num_cpus=args.threads,
                        pool=PoolConfig(num_actors=1, cpus_per_actor=args.threads),
                        progress=False)
    s = run_batch(opts)
    print(json.dumps({"slices": s.slices, "seconds": s.seconds, "startup": s.startup_seconds,
                      "run_seconds": s.run_seconds,
                      "failed": s.failed, "driver_mb": s.driver_peak_rss_mb,
                      "actor_mb": [w["peak_rss_mb"] for w in s.workers]}))


def run_pipeline(cohort: Path, out: Path, ckpt: Path, args: argparse.Namespace) -> dict:
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(cohort), str(out),
           str(ckpt), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    peak = [0.0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline run failed ({proc.returncode}):\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - t0
    res["tree_peak_mb"] = peak[0]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--slices", type=int, default=6, help="slices per case")
    ap.add_argument("--size", type=int, default=64, help="slice side in pixels")
    ap.add_argument("--image-size", type=int, default=256, help="tiny model input side")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from pipeline.synthetic import synthetic_cohort

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        work = Path(tmp)
        ckpt = make_model(work / "tiny.safetensors", args.image_size)
        big = max(args.cases)
        runs, bares = {}, []
        synthetic_cohort(work / f"cohort_{big}.zarr", big, args.slices, args.size, seed=big)
        # the bare loop before and after the pipeline runs (a shared machine's load drifts);
        # the faster of the two is the reference, which favours the bare loop
        bares.append(bare_loop(work / f"cohort_{big}.zarr", work / "bare.zarr", ckpt,
                               args.batch_size, args.threads))
        for n in sorted(args.cases):
            cohort = work / f"cohort_{n}.zarr"
            if n != big:
                synthetic_cohort(cohort, n, args.slices, args.size, seed=n)
            runs[n] = run_pipeline(cohort, work / f"labels_{n}.zarr", ckpt, args)
            assert not runs[n]["failed"], runs[n]
        bares.append(bare_loop(work / f"cohort_{big}.zarr", work / "bare.zarr", ckpt,
                               args.batch_size, args.threads))
        bare = min(bares, key=lambda b: b["seconds"] - b["load_seconds"])
        import zarr

        pipe_out = zarr.open_group(str(work / f"labels_{big}.zarr"), mode="r")
        bare_out = zarr.open_group(str(work / "bare.zarr"), mode="r")
        same = all(np.array_equal(pipe_out[c]["labels"][...], bare_out[c]["labels"][...])
                   for c, _ in bare_out.groups())

    p = runs[big]
    bare_all = bare["slices"] / bare["seconds"]
    bare_hot = bare["slices"] / (bare["seconds"] - bare["load_seconds"])
    pipe_all = p["slices"] / p["seconds"]
    pipe_hot = p["slices"] / p["run_seconds"]
    print(f"cohort: {big} cases x {args.slices} slices of {args.size}x{args.size}, tiny model "
          f"at {args.image_size} px, batch {args.batch_size}, {args.threads} torch threads, "
          f"{os.cpu_count()} CPUs")
    print("bare loop runs (before, after the pipeline): " + ", ".join(
        f"{b['slices'] / (b['seconds'] - b['load_seconds']):.2f}" for b in bares) + " slices/s")
    print(f"bare loop : {bare_all:6.2f} slices/s with model load ({bare['load_seconds']:.1f} s),"
          f" {bare_hot:6.2f} without")
    print(f"pipeline  : {pipe_all:6.2f} slices/s with start-up ({p['startup']:.1f} s Ray + "
          f"actor + model; {p['seconds']:.1f} s in all, Ray shut-down included), "
          f"{pipe_hot:6.2f} without")
    print(f"ratio pipeline/bare: {pipe_all / bare_all:.2f}x with start-up, "
          f"{pipe_hot / bare_hot:.2f}x without (target >= 0.85x)")
    print(f"labels identical to the bare loop: {same}")
    print("peak memory (MiB): cases  driver  actors  driver+actors  whole process tree")
    for n in sorted(runs):
        r = runs[n]
        both = r["driver_mb"] + sum(r["actor_mb"])
        print(f"                  {n:5d} {r['driver_mb']:7.0f} {sum(r['actor_mb']):7.0f} "
              f"{both:14.0f} {r['tree_peak_mb']:19.0f}")
    lo, hi = runs[min(runs)], runs[max(runs)]
    ratio = (hi["driver_mb"] + sum(hi["actor_mb"])) / (lo["driver_mb"] + sum(lo["actor_mb"]))
    print(f"memory {max(runs)} vs {min(runs)} cases: {ratio:.2f}x driver+actors, "
          f"{hi['tree_peak_mb'] / lo['tree_peak_mb']:.2f}x whole tree (target <= 1.2x)")


if __name__ == "__main__":
    main()
