"""What each added category costs in ``segmote batch --categories``, against the embedding.

    python benchmarks/bench_categories.py [--repeats 7] [--threads 2] [--slices 8]

On the bundled demo model (its vocabulary, its input size) and demo CT slices, for the same
batch of slices, measured interleaved in one run (medians of ``--repeats``):

- ``embed``: the encoder alone on the batch (``inference.encode_batch``), the cost paid once;
- ``binary``: today's pipeline path without categories (``qc.segment_with_qc``: encoder, one
  PPT pass, its QC re-prompt);
- ``K categories``: ``categories.segment_categories`` with K = 1..4 (encoder once, per category
  one PPT pass with its text token + one QC re-prompt, the label map).

Printed: seconds per slice, the cost of each added category (slope of K), and both as a ratio
of the embedding cost. Also checks that the encoder ran once per slice for K = 4.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CATS = ("lung", "liver", "kidney", "spine")


def demo_ct_slices(n: int) -> np.ndarray:
    from training.phantoms_ct import ct_volume

    rng = np.random.default_rng(11)
    vol = np.asarray(ct_volume(rng)[0])
    idx = np.linspace(0, len(vol) - 1, n).round().astype(int)
    return vol[idx].astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=8)
    args = ap.parse_args(argv)
    import torch

    from segmote_core.build import load_demo_model
    from segmote_core.categories import segment_categories
    from segmote_core.inference import encode_batch, prepare_batch
    from segmote_core.qc import segment_with_qc

    torch.set_num_threads(args.threads)
    model = load_demo_model()
    slices = demo_ct_slices(args.slices)
    n = len(slices)
    runs = {"embed": lambda: encode_batch(model, prepare_batch(model, slices, "CT")[0], n),
            "binary": lambda: segment_with_qc(model, slices, "CT", chunk=n)}
    for k in range(1, len(CATS) + 1):
        runs[f"{k} categories"] = (lambda k=k: segment_categories(model, slices, CATS[:k], "CT",
                                                                   chunk=n))
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for name, fn in runs.items():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    calls = []
    hook = model.sam.image_encoder.register_forward_hook(
        lambda _m, a, _o: calls.append(int(a[0].shape[0])))
    segment_categories(model, slices, CATS, "CT", chunk=n)
    hook.remove()
    med = {k: statistics.median(v) / n for k, v in times.items()}
    embed = med["embed"]
    ks = np.arange(1, len(CATS) + 1)
    per_k = np.array([med[f"{k} categories"] for k in ks])
    slope = float(np.polyfit(ks, per_k, 1)[0])
    print(f"model: bundled demo ({model.config.model_type}, {model.image_size} px), {n} CT slices "
          f"of {slices.shape[1]}x{slices.shape[2]}, {args.threads} threads, median of "
          f"{args.repeats}")
    print(f"{'run':<14} {'ms/slice':>9} {'x embed':>8}")
    for name, v in med.items():
        print(f"{name:<14} {1000 * v:9.1f} {v / embed:8.2f}")
    print(f"each added category: {1000 * slope:.1f} ms/slice = {slope / embed:.2f}x the "
          f"embedding; 4 categories vs binary: {med['4 categories'] / med['binary']:.2f}x")
    print(f"encoder calls for 4 categories: {len(calls)} call(s), {sum(calls)} slice(s) "
          f"(= {n}: embedded once)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
