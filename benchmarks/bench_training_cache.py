"""Training steps with pre-computed embeddings vs the encoder in the loop.

Runs the real trainer (phase ``segmote``: frozen encoder, SegMoTE parts training) twice on the
same slices and prompts: once with the embedding cache, once computing the encoder every step.
Prints the encoder calls made by the training steps themselves, the median step time and
steps/s of each, and their ratio; and the throughput (slices/s) of the resumable, chunked
embedding pre-compute against a bare loop of the stock SAM image encoder over the same slices. The cohort is a synthetic one written to a temporary folder
unless ``--cohort`` names a labelled cohort (e.g. the demo cohort).

    python benchmarks/bench_training_cache.py [--steps 20] [--batch-size 8] [--cohort PATH]
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from segmote_core.config import SegMoTEConfig
from training.dataset import build_slice_dataset
from training.train_config import OptimConfig, TrainConfig
from training.trainer import Trainer


def synthetic_cohort(path: Path, cases: int = 4, slices: int = 8, size: int = 160) -> Path:
    """Volumes with an ellipse (label 1) holding a smaller ellipse (label 2)."""
    rng = np.random.default_rng(0)
    root = zarr.open_group(str(path), mode="w")
    root.attrs["segmote"] = {"kind": "cohort", "version": 1}
    yy, xx = np.mgrid[:size, :size]
    for c in range(cases):
        labels = np.zeros((slices, size, size), np.uint8)
        for z in range(slices):
            cy, cx, a, b = *rng.uniform(60, 100, 2), *rng.uniform(25, 45, 2)
            d = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2
            labels[z][d < 1] = 1
            labels[z][d < 0.3] = 2
        image = (200 + 400 * labels.astype(np.float32) + rng.normal(0, 30, labels.shape)).astype(np.float32)
        g = root.create_group(f"case_{c:02d}")
        g.attrs.update({"dataset": "synthetic", "categories": {"1": "outer", "2": "inner"},
                        "auto_category": "object", "patient": f"p{c}"})
        img = g.create_array("image", shape=image.shape, dtype=image.dtype,
                             chunks=(1, size, size))
        img[...] = image
        img.attrs["modality"] = "MR"
        lab = g.create_array("labels", shape=labels.shape, dtype=labels.dtype,
                             chunks=(1, size, size))
        lab[...] = labels
    return path


def run(trainer: Trainer, steps: int) -> tuple[float, int, float]:
    """(median step seconds, encoder calls during the steps, cache seconds)."""
    calls: list[int] = []
    trainer.model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    t0 = time.perf_counter()
    trainer.prepare_cache()
    cache_s = time.perf_counter() - t0
    calls.clear()
    trainer.fit(max_steps=steps, show_progress=False)
    with trainer.metrics_csv.open(newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)][1:]  # skip warm-up
    return statistics.median(seconds), len(calls), cache_s


def bench_precompute(ds, model_config: SegMoTEConfig, folder: Path, repeats: int = 3
                     ) -> tuple[float, float]:
    """Median slices/s of (chunked, signed, written) pre-compute and of a bare encoder loop."""
    from segmote_core.build import build_segmote
    from training.dataset import model_input
    from training.precompute import load_or_compute_features

    model = build_segmote(model_config).eval()
    ours, bare = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        load_or_compute_features(model, ds.images, ds.extents, folder / f"emb{r}.safetensors")
        ours.append(ds.num_slices / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.no_grad():
            for a in range(0, ds.num_slices, 8):
                x = model_input(model, ds.images[a:a + 8], ds.extents[a:a + 8])
                model.sam.image_encoder(x)
        bare.append(ds.num_slices / (time.perf_counter() - t0))
    return statistics.median(ours), statistics.median(bare)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cohort", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = args.cohort or synthetic_cohort(Path(tmp) / "cohort.zarr")
        model = SegMoTEConfig(model_type="tiny")
        ds = build_slice_dataset(cohort, image_size=model.resolved_image_size, split=None,
                                 max_slices_per_case=16)
        print(f"slices {ds.num_slices}, masks {ds.num_masks}, batch {args.batch_size}, "
              f"model tiny @ {model.resolved_image_size} px, {args.threads} threads")
        results = {}
        for name, cached in (("cached", True), ("encoder", False)):
            cfg = TrainConfig(model=model, cache_embeddings=cached,
                              optim=OptimConfig(epochs=1, steps_per_epoch=args.steps + 1,
                                                batch_size=args.batch_size),
                              output_dir=str(Path(tmp) / name), checkpoint_every=10_000)
            results[name] = run(Trainer(cfg, dataset=ds, resume=False), args.steps + 1)
        (c_med, c_calls, c_cache), (e_med, e_calls, _) = results["cached"], results["encoder"]
        print(f"with cache    : median step {c_med * 1e3:8.1f} ms  {1 / c_med:6.2f} steps/s  "
              f"encoder calls in steps: {c_calls}  (one-off pre-compute {c_cache:.1f} s)")
        print(f"encoder/step  : median step {e_med * 1e3:8.1f} ms  {1 / e_med:6.2f} steps/s  "
              f"encoder calls in steps: {e_calls}")
        print(f"speed-up      : {e_med / c_med:.1f}x steps/s with the cache")
        ours, bare = bench_precompute(ds, model, Path(tmp))
        print(f"pre-compute   : {ours:6.2f} slices/s chunked + signed + written, bare stock "
              f"SAM encoder loop {bare:6.2f} slices/s: ratio {ours / bare:.2f} "
              f"({ds.num_slices} slices, median of 3)")


if __name__ == "__main__":
    main()
