"""Prompt -> mask: SegMoTEPredictor vs stock SamPredictor on the same vit_b embedding.

Both predictors decode the same embedding (computed once by SegMoTE's encoder and handed to
SamPredictor), alternating call by call so machine noise hits both alike. Prints medians and
the ratio (target: SegMoTE <= 1.15x stock).

    python benchmarks/bench_prompt.py [--repeats 30] [--model-type vit_b]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from segment_anything import SamPredictor

from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote


def _ct_slice(size: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.47 * size)) ** 2 < 1
    img = np.where(body, 40, -1000) + rng.normal(0, 15, (size, size))
    liver = ((yy - 0.45 * size) / (0.12 * size)) ** 2 + ((xx - 0.35 * size) / (0.15 * size)) ** 2 < 1
    img[liver] = 90 + rng.normal(0, 10, liver.sum())
    return (img + 1024).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="vit_b")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type=args.model_type))
    ours = SegMoTEPredictor(model)
    image = _ct_slice()
    t0 = time.perf_counter()
    ours.set_image(image, modality="CT")
    print(f"embedding ({args.model_type}, bf16={ours.bf16}): {time.perf_counter() - t0:.2f} s")

    # The same model without the HQ fusion branch: shows what that (required) branch costs.
    lean = build_segmote(SegMoTEConfig(model_type=args.model_type, hq_fusion=False))
    lean.sam.load_state_dict(model.sam.state_dict())
    no_fusion = SegMoTEPredictor(lean)
    no_fusion.set_embedding(ours.get_embedding())

    stock = SamPredictor(model.sam)
    stock.features = ours.features.image_embeddings
    stock.original_size, stock.input_size = ours.original_size, ours.input_size
    stock.is_image_set = True

    prompts = {
        "box": dict(box=np.array([150, 160, 330, 320])),
        "point": dict(point_coords=np.array([[180, 230]]), point_labels=np.array([1])),
        "3 points": dict(point_coords=np.array([[180, 230], [200, 240], [400, 100]]),
                         point_labels=np.array([1, 1, 0])),
    }
    print(f"fusion convs in bf16: {ours.bf16}; torch threads: {torch.get_num_threads()}")
    print(f"{'prompt':<10}{'stock ms':>10}{'segmote ms':>12}{'ratio':>8}{'no-HQ ms':>10}{'ratio':>8}")
    ratios, lean_ratios = [], []
    for name, kw in prompts.items():
        runs = {"stock": lambda: stock.predict(**kw, multimask_output=False),
                "ours": lambda: ours.predict(**kw), "lean": lambda: no_fusion.predict(**kw)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(args.repeats):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        ms, mo, ml = (statistics.median(times[k]) * 1e3 for k in ("stock", "ours", "lean"))
        ratios.append(mo / ms)
        lean_ratios.append(ml / ms)
        print(f"{name:<10}{ms:>10.1f}{mo:>12.1f}{mo / ms:>8.2f}{ml:>10.1f}{ml / ms:>8.2f}")
    print(f"median ratio SegMoTE / stock SAM: {statistics.median(ratios):.2f} (target <= 1.15); "
          f"without the HQ fusion branch: {statistics.median(lean_ratios):.2f}")


if __name__ == "__main__":
    main()
