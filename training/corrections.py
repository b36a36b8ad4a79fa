"""``segmote train --corrections OUT.zarr --out NEW.safetensors``: learn from reviewed cases.

The loop itself lives in the core (:mod:`segmote_core.finetune`, also run by the napari Review
panel); this module is its command line: arguments, a tqdm bar, Ctrl-C as a resumable stop and
a summary with the lineage (docs/training.md, "Learning from corrections").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_corrections_arguments", "run_from_corrections"]


def add_corrections_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning from corrections (instead of CONFIG)")
    g.add_argument("--corrections", type=Path, default=None, metavar="OUT.zarr",
                   help="output store of segmote batch whose reviewed cases (corrections/, or "
                        "labels marked reviewed: true) are the training data")
    g.add_argument("--cohort", type=Path, default=None,
                   help="the store's cohort (default: the one it records; another is refused)")
    g.add_argument("--parent", default="demo",
                   help="checkpoint that made the pre-labels (default: the bundled demo model)")
    g.add_argument("--sam-checkpoint", default=None, help="official SAM .pth of the parent")
    g.add_argument("--out", type=Path, default=None, help="the new checkpoint (.safetensors)")
    g.add_argument("--steps", type=int, default=150, help="fine-tune steps (default 150)")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of reviewed cases held out to pick the step (default 0.2)")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="embedding caches (default: OUT.zarr.embeddings beside the store)")
    g.add_argument("--cases", nargs="+", default=None, help="only these reviewed cases")


def run_from_corrections(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from segmote_core.cli import summary, user_error
    from segmote_core.finetune import FineTuneConfig, finetune_from_store
    from segmote_core.progress import Cancelled

    if args.out is None:
        return user_error("train", ValueError("--corrections needs --out NEW.safetensors"),
                          args.verbose)
    config = FineTuneConfig(steps=args.steps, val_fraction=args.val_fraction, lr=args.lr,
                            seed=args.seed)
    bars: dict[int, tqdm] = {}

    def tick(done: int, total: int) -> None:
        bar = bars.get(total)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[total] = tqdm(total=total, initial=done, desc="fine-tune"
                                     if total == config.steps else "embeddings")
        bar.update(done - bar.n)
    try:
        res = finetune_from_store(args.corrections, args.parent, args.out, cohort=args.cohort,
                                  config=config, sam_checkpoint=args.sam_checkpoint,
                                  cache_dir=args.cache_dir, cases=args.cases, progress=tick)
    except (KeyboardInterrupt, Cancelled):
        sys.stderr.write("segmote train: interrupted; rerun the same command to resume the "
                         "fine-tune where it stopped\n")
        return 130
    except (ValueError, OSError) as exc:   # FineTuneDataError, CheckpointError are ValueErrors
        return user_error("train", exc, args.verbose)
    finally:
        for bar in bars.values():
            bar.close()
    summary([f"segmote train: fine-tuned from {len(res.train_cases)} reviewed case(s), "
             f"validated on {len(res.val_cases)} ({', '.join(res.val_cases)})",
             f"  validation Dice {res.dice_before:.4f} -> {res.dice_after:.4f} (best step "
             f"{res.best_step} of {res.steps}) in {res.seconds:.0f} s",
             f"  model: {args.out} (+ .json with the lineage)"])
    return 0
