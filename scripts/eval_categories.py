"""Prompt-free Dice per category, end to end through ``segmote batch --categories``.

    python scripts/eval_categories.py COHORT.zarr SELECTION.json OUT_DIR [--checkpoint F]

For each dataset of the held-out split (``--split test``) that has several categories, the
dataset's test cases are segmented by ``segmote batch COHORT OUT --cases ... --categories
<the dataset's categories>`` (a subprocess: the real command, a local Ray) and each category's
label is compared with the cohort's labels:

- ``auto`` (the demo tables' convention, ``python -m training.make_demo_model``'s evaluation):
  mean Dice over the masks the tables score: the held-out split's curated slices (the
  selection's), each category's mask where it covers at least 16 pixels at the model's input
  (``training.dataset.build_slice_dataset``, the same call), compared at the cohort's
  resolution;
- ``all_slices``: mean Dice over every slice that holds the category, however small (a
  slice with 11 voxels of it counts as much as one with 2000);
- ``volume``: Dice over the whole case (slices without the category count: a category drawn
  where there is none lowers it);
- ``false_slices``: slices without the category where the model drew some.

Writes ``OUT_DIR/categories.csv`` and ``OUT_DIR/categories.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort", type=Path)
    ap.add_argument("selection", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", default=None, help="SegMoTE .safetensors (default: demo)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num-cpus", default="2")
    ap.add_argument("--reuse", action="store_true",
                    help="score the stores an earlier run left in OUT_DIR instead of running")
    args = ap.parse_args(argv)
    import zarr

    from segmote_core.build import demo_model_path
    from segmote_core.checkpoint import checkpoint_config, read_checkpoint_info
    from training.dataset import build_slice_dataset

    # the tables' masks at the model's input size: read from the checkpoint, no model built
    ckpt = Path(args.checkpoint) if args.checkpoint else demo_model_path()
    size = checkpoint_config(ckpt, read_checkpoint_info(ckpt)).resolved_image_size
    tables = build_slice_dataset(args.cohort, image_size=size, selection=args.selection,
                                 split=args.split, keep_original=True)

    sel = json.loads(args.selection.read_text())
    root = zarr.open_group(str(args.cohort), mode="r")
    by_dataset: dict[str, list[str]] = {}
    for case_id in sel["splits"][args.split]:
        attrs = dict(root[case_id].attrs)
        if len(attrs.get("categories") or {}) > 1:
            by_dataset.setdefault(attrs["dataset"], []).append(case_id)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset, cases in sorted(by_dataset.items()):
        cats = dict(root[cases[0]].attrs)["categories"]       # id -> name
        names = [cats[k] for k in sorted(cats, key=int)]
        store = args.out / f"{dataset}.zarr"
        cmd = [sys.executable, "-m", "pipeline", str(args.cohort), str(store), "--cases",
               *cases, "--categories", *names, "--num-cpus", args.num_cpus, "--no-progress",
               "--overwrite"]
        if args.checkpoint:
            cmd += ["--segmote-checkpoint", args.checkpoint]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("RAY_ADDRESS", None)
        if not args.reuse:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            sys.stderr.write(proc.stdout + proc.stderr[-2000:])
            if proc.returncode != 0:
                raise SystemExit(f"segmote batch failed ({proc.returncode}) on {dataset}")
        out = zarr.open_group(str(store), mode="r")
        table = dict(out.attrs)["label_table"]
        value = {name: int(v) for v, name in table.items()}
        labels = {case_id: np.asarray(out[case_id]["labels"]) for case_id in cases}  # read once
        for name in names:
            gt_id = int(next(k for k, v in cats.items() if v == name))
            per_slice, gts, preds, false = [], [], [], 0
            for case_id in cases:
                gt = np.asarray(root[case_id]["labels"]) == gt_id
                pred = labels[case_id] == value[name]
                gt, pred = gt.reshape(-1, *gt.shape[-2:]), pred.reshape(-1, *pred.shape[-2:])
                for z in range(len(gt)):
                    if gt[z].any():
                        per_slice.append(dice(gt[z], pred[z]))
                    elif pred[z].any():
                        false += 1
                gts.append(gt.ravel())
                preds.append(pred.ravel())
            scored = []
            for i in range(tables.num_masks):
                j = int(tables.mask_slice[i])
                if tables.categories[i] != name or tables.cases[j] not in cases:
                    continue
                pred = labels[tables.cases[j]]
                pred = pred[int(tables.z[j])] if pred.ndim == 3 else pred
                scored.append(dice(np.asarray(tables.original_masks[i], bool),
                                   pred == value[name]))
            rows.append({"dataset": dataset, "category": name, "cases": len(cases),
                         "masks": len(scored), "auto": float(np.mean(scored)),
                         "slices": len(per_slice), "all_slices": float(np.mean(per_slice)),
                         "volume": dice(np.concatenate(gts), np.concatenate(preds)),
                         "false_slices": false})
    lines = ["| dataset | category | auto (tables' masks) | masks | every slice with it | slices "
             "| volume Dice | empty slices drawn on |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['category']} | {r['auto']:.4f} | {r['masks']} "
                     f"| {r['all_slices']:.4f} | {r['slices']} | {r['volume']:.4f} "
                     f"| {r['false_slices']} |")
    text = "\n".join(lines) + "\n"
    (args.out / "categories.md").write_text(text)
    import csv

    with open(args.out / "categories.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
