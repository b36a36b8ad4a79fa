"""``segmote train`` and ``segmote evaluate`` (registered through ``training.cli``)."""

from __future__ import annotations

import argparse
import logging
import sys
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
    p.add_argument("config", type=Path, nargs="?", default=None,
                   help="training config (YAML); leave out with --corrections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   type=_parse_override, help="override a config key, e.g. optim.epochs=2")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if OUTPUT_DIR/checkpoint holds a checkpoint")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a resumable checkpoint) after this many steps")
    p.add_argument("--random-encoder", action="store_true",
                   help="train a vit_* model without sam_checkpoint, on a randomly initialised "
                        "encoder, on purpose (refused otherwise)")
    from .corrections import add_corrections_arguments

    add_corrections_arguments(p)
    p.set_defaults(func=run_train)


def _check_files(config) -> None:
    """Input files exist before any model is built (a missing one is a one-line error)."""
    for what, value in (("data.cohort", config.data.cohort), ("data.selection",
                        config.data.selection), ("sam_checkpoint", config.sam_checkpoint),
                        ("init_checkpoint", config.init_checkpoint)):
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{what}: {value} does not exist")
    if not config.data.cohort:
        raise ValueError("data.cohort is not set (the training cohort .zarr)")


def run_train(args: argparse.Namespace) -> int:
    from segmote_core.checkpoint import describe_base
    from segmote_core.cli import summary
    from segmote_core.progress import Cancelled

    from .train_config import load_train_config
    from .trainer import Trainer

    if getattr(args, "corrections", None) is not None:
        from .corrections import run_from_corrections

        return run_from_corrections(args)
    if args.config is None:
        from segmote_core.cli import user_error

        return user_error("train", ValueError("give a CONFIG.yaml, or --corrections OUT.zarr "
                                              "--out NEW.safetensors"), args.verbose)
    overrides = dict(args.overrides)
    if args.random_encoder:
        overrides["random_encoder"] = True
    config = load_train_config(args.config, overrides)
    _check_files(config)
    trainer = Trainer(config, resume=not args.no_resume)
    try:
        result = trainer.fit(max_steps=args.max_steps)
    except (KeyboardInterrupt, Cancelled):
        sys.stderr.write(f"segmote train: interrupted; {trainer.resume_hint()}\n")
        return 130
    base = getattr(trainer.model, "base_source", None) or {}
    lines = [f"segmote train: {result.position.global_step} of {trainer.total_steps} steps "
             f"in {result.seconds:.0f} s, last loss {result.last_loss:.4f}"]
    if result.model_path is None:
        lines.append(f"  stopped early: rerun the same command to resume from "
                     f"{result.checkpoint}")
    else:
        lines.append(f"  model: {result.model_path} (+ .json)")
    lines += [f"  base: {describe_base(base)}", f"  metrics: {result.metrics_csv}",
              f"  checkpoint: {result.checkpoint}"]
    summary(lines)
    return 0


def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice tables and routing figures of a checkpoint on a labelled cohort",
        description="Writes per_mask.csv, table_*.csv, tables.md, summary.json, "
                    "expert_usage.png and routing_heatmaps.png into OUT_DIR.")
    p.add_argument("checkpoint", help="SegMoTE .safetensors, or 'demo' for the bundled model")
    p.add_argument("cohort", type=Path, nargs="?", default=None,
                   help="labelled cohort zarr (may be left out with --real-image-check)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--real-image-check", action="store_true",
                   help="also (or, without a cohort, only) run the label-free real-image check: "
                        "random boxes on pydicom's real CT/MR slices, >= 90%% of boxes with "
                        ">= 95%% of the mask inside (real_image_check.json, real_images.png)")
    p.add_argument("--boxes-per-slice", type=int, default=12,
                   help="boxes per slice of the real-image check")
    p.add_argument("--sam-checkpoint", default=None,
                   help="official SAM .pth the SegMoTE weights sit on (default: the file "
                        "recorded at training time, when it is still there; not for models "
                        "that hold their base)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load the weights on a SAM checkpoint whose sha256 differs from the "
                        "one they were trained on")
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

    from segmote_core.build import load_demo_model, load_segmote, resolve_sam_checkpoint
    from segmote_core.cli import summary
    from segmote_core.io import open_cohort

    from .dataset import build_slice_dataset
    from .evaluate import evaluate_model, write_report
    from .trainer import resolve_device

    device = resolve_device(args.device)
    if args.cohort is None and not args.real_image_check:
        raise ValueError("give a labelled COHORT, or --real-image-check")
    if args.cohort is not None:
        open_cohort(args.cohort)         # a wrong path fails before the model loads
    if args.selection is not None and not args.selection.is_file():
        raise FileNotFoundError(f"--selection {args.selection} does not exist")
    if args.checkpoint == "demo":
        model = load_demo_model(device=device)
    else:
        sam = resolve_sam_checkpoint(args.checkpoint, args.sam_checkpoint,
                                     allow_other_base=args.allow_other_base)
        model = load_segmote(args.checkpoint, sam_checkpoint=sam, device=device,
                             allow_other_base=args.allow_other_base)
    if torch.get_num_threads() > 4 and device.type == "cpu":
        torch.set_num_threads(4)
    code = 0
    if args.real_image_check:
        from .real_image_check import run_real_image_check

        check = run_real_image_check(model, args.out_dir, boxes_per_slice=args.boxes_per_slice,
                                     title=args.title or Path(str(args.checkpoint)).stem)
        s = check.summary()
        summary([f"segmote evaluate: real-image check {s['boxes_passed']}/{s['boxes']} boxes "
                 f"({100 * s['pass_rate']:.1f}%) with >= 95% of the mask inside: "
                 f"{'passed' if s['passed'] else 'FAILED'}",
                 f"  report: {args.out_dir / 'real_image_check.json'}"])
        code = 0 if check.passed else 1
        if args.cohort is None:
            return code
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
    dice = result.rows.groupby("mode")["dice"].agg(["mean", "count"])
    summary([f"segmote evaluate: {ds.num_slices} slices of {args.cohort}"]
            + [f"  mean Dice {mode:<5} {row['mean']:.4f}  ({int(row['count'])} masks)"
               for mode, row in dice.iterrows()]
            + [f"  tables: {paths['tables_md']}", f"  report: {args.out_dir}"])
    return code
