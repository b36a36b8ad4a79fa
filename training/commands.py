"""``segmote train`` and ``segmote evaluate`` (registered through ``training.cli``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

__all__ = ["register_train", "register_evaluate", "run_train", "run_evaluate"]

log = logging.getLogger(__name__)


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train SegMoTE (or the demo's tiny SAM) from a YAML config",
        description="Train as docs/training.md describes; resumes from OUTPUT_DIR/checkpoint "
                    "when present. "
                    "Every config key is documented in docs/training.md.")
    p.add_argument("config", type=Path, help="training config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   type=_parse_override, help="override a config key, e.g. optim.epochs=2")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if OUTPUT_DIR/checkpoint holds a checkpoint")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a resumable checkpoint) after this many steps")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from segmote_core.progress import Cancelled

    from .train_config import load_train_config
    from .trainer import Trainer

    config = load_train_config(args.config, dict(args.overrides))
    trainer = Trainer(config, resume=not args.no_resume)
    try:
        result = trainer.fit(max_steps=args.max_steps)
    except (KeyboardInterrupt, Cancelled):
        log.warning("stopped; rerun the same command to resume from %s", trainer.ckpt_dir)
        return 130
    if result.model_path is None:
        log.info("stopped at global step %d; rerun to resume", result.position.global_step)
    else:
        log.info("model: %s (%.0f s, last loss %.4f)", result.model_path, result.seconds,
                 result.last_loss)
    return 0


def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice tables and routing figures of a checkpoint on a labelled cohort",
        description="Writes per_mask.csv, table_*.csv, tables.md, summary.json, "
                    "expert_usage.png and routing_heatmaps.png into OUT_DIR.")
    p.add_argument("checkpoint", help="SegMoTE .safetensors, or 'demo' for the bundled model")
    p.add_argument("cohort", type=Path, help="labelled cohort zarr")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--sam-checkpoint", default=None,
                   help="official SAM .pth the SegMoTE weights sit on (not for tiny models)")
    p.add_argument("--selection", type=Path, default=None,
                   help="selection.json of 'segmote curate'; evaluates its --split")
    p.add_argument("--split", default="test", help="split of the selection (default: test)")
    p.add_argument("--datasets", nargs="*", default=[], help="only these datasets")
    p.add_argument("--modes", nargs="*", default=["point", "box", "auto"],
                   choices=["point", "box", "auto"])
    p.add_argument("--slice-stride", type=int, default=1,
                   help="without a selection, every n-th slice with foreground")
    p.add_argument("--max-slices-per-case", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--title", default=None, help="heading of tables.md")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from segmote_core.build import load_demo_model
    from segmote_core.build import load_segmote

    from .dataset import build_slice_dataset
    from .evaluate import evaluate_model, write_report
    from .trainer import resolve_device

    device = resolve_device(args.device)
    if args.checkpoint == "demo":
        model = load_demo_model(device=device)
    else:
        model = load_segmote(args.checkpoint, sam_checkpoint=args.sam_checkpoint, device=device)
    if torch.get_num_threads() > 4 and device.type == "cpu":
        torch.set_num_threads(4)
    with tqdm(desc="read cohort", unit="case") as bar:
        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        ds = build_slice_dataset(
            args.cohort, image_size=model.image_size, selection=args.selection,
            split=args.split if args.selection else None, datasets=args.datasets,
            slice_stride=args.slice_stride, max_slices_per_case=args.max_slices_per_case,
            keep_original=True, progress=tick)
    with tqdm(total=ds.num_slices, desc="evaluate", unit="slice") as bar:
        result = evaluate_model(model, ds, modes=args.modes,
                                progress=lambda d, t: bar.update(d - bar.n))
    paths = write_report(result, args.out_dir,
                         title=args.title or Path(str(args.checkpoint)).stem)
    summary = result.rows.groupby("mode")["dice"].mean()
    for mode, dice in summary.items():
        log.info("mean Dice %-5s %.4f", mode, dice)
    log.info("tables: %s", paths["tables_md"])
    return 0
