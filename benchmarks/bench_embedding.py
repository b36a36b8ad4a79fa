"""Embedding: SegMoTE's encoder path (fp32 and bf16 autocast) vs stock SamPredictor.set_image.

Same random vit_b weights, same 512 x 512 CT slice, runs alternated. Also prints the accuracy
cost of bf16: relative error of the embedding and Dice of the resulting masks against fp32.

    python benchmarks/bench_embedding.py [--repeats 3] [--model-type vit_b]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from segment_anything import SamPredictor

from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote
from segmote_core.transforms import normalize_intensity

from bench_prompt import _ct_slice


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="vit_b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type=args.model_type))
    image = _ct_slice()
    rgb8 = normalize_intensity(image, "CT").astype(np.uint8)
    fp32, bf16 = SegMoTEPredictor(model, "fp32"), SegMoTEPredictor(model, "bf16")
    stock = SamPredictor(model.sam)
    times: dict[str, list[float]] = {"stock SamPredictor fp32": [], "SegMoTE fp32": [],
                                     "SegMoTE bf16": []}
    runs = [("stock SamPredictor fp32", lambda: stock.set_image(rgb8)),
            ("SegMoTE fp32", lambda: fp32.set_image(image, modality="CT")),
            ("SegMoTE bf16", lambda: bf16.set_image(image, modality="CT"))]
    for _ in range(args.repeats):
        for name, fn in runs:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["stock SamPredictor fp32"])
    print(f"{'path':<26}{'median s':>10}{'vs stock':>10}")
    for name, ts in times.items():
        print(f"{name:<26}{statistics.median(ts):>10.2f}{statistics.median(ts) / base:>10.2f}")

    e32 = fp32.features.image_embeddings
    e16 = bf16.features.image_embeddings
    rel = ((e16 - e32).norm() / e32.norm()).item()
    print(f"bf16 embedding relative error vs fp32: {rel:.4f}")
    dices = []
    for box in ([150, 160, 330, 320], [60, 60, 450, 450], [200, 100, 300, 260]):
        m32 = fp32.predict(box=np.array(box)).masks[0]
        m16 = bf16.predict(box=np.array(box)).masks[0]
        dices.append(_dice(m32, m16))
    print(f"bf16 vs fp32 mask Dice (box prompts, median of {len(dices)}): "
          f"{statistics.median(dices):.4f}")


if __name__ == "__main__":
    main()
