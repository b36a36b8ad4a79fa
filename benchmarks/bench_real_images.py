"""Real-image check (no labels) of the bundled models on pydicom's real CT/MR slices.

    python benchmarks/bench_real_images.py [--boxes-per-slice 12] [--seed 0] [--out DIR]

For each model: random boxes over the body of every distinct real CT/MR slice shipped inside
pydicom; a box passes when >= 95 % of its (non-empty) mask lies inside it; the check passes
when >= 90 % of the boxes pass (training/real_image_check.py). Printed per model: boxes passed,
mean inside fraction, empty masks, median embedding and prompt times, and the prompt-time ratio
against LiteMedSAM alone measured in the same run (the stock-decoder reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segmote_core.build import demo_model_path, load_demo_model, load_lite_medsam  # noqa: E402
from training.real_image_check import real_image_check, write_check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes-per-slice", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write each model's report here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    models = {"litemedsam": ("LiteMedSAM (bundled, no training)", load_lite_medsam)}
    for base in ("lite_medsam", "tiny"):
        if demo_model_path(base).is_file():
            models[f"demo_{base}"] = (f"SegMoTE demo ({base})",
                                      lambda base=base: load_demo_model(base=base))
    rows = {}
    for slug, (name, load) in models.items():
        result = real_image_check(load(), boxes_per_slice=args.boxes_per_slice, seed=args.seed)
        rows[name] = result.summary()
        if args.out is not None:
            write_check(result, args.out / slug, title=name)
    ref = rows["LiteMedSAM (bundled, no training)"]["median_prompt_ms"]
    head = (f"{'model':38s} {'passed':>9s} {'rate':>6s} {'inside':>7s} {'empty':>5s} "
            f"{'embed ms':>9s} {'prompt ms':>9s} {'prompt ratio':>12s}")
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        lines.append(f"{name:38s} {s['boxes_passed']:>4d}/{s['boxes']:<4d} "
                     f"{100 * s['pass_rate']:5.1f}% {s['mean_inside_fraction'] or 0:7.3f} "
                     f"{s['empty_masks']:5d} {s['median_embed_ms']:9.1f} "
                     f"{s['median_prompt_ms']:9.1f} {s['median_prompt_ms'] / ref:11.2f}x")
    lines.append(f"criterion: {next(iter(rows.values()))['criterion']}; "
                 f"{next(iter(rows.values()))['slices']} slices, seed {args.seed}")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.out is not None:
        (args.out / "bench_real_images.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
