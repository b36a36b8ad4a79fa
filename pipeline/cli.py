"""``segmote batch COHORT.zarr OUT.zarr``: overnight segmentation of a cohort on Ray.

Exit codes: 0 every selected case is complete; 1 at least one case failed (see the report);
2 the run could not start (bad options, missing model, output of another model without
``--overwrite``, an input inside the output, another run writing the same output, an output
that cannot be written, an actor pool the cluster cannot place, actors that cannot use their
GPU or differ in precision); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

__all__ = ["register", "run", "main", "add_arguments"]

log = logging.getLogger("segmote.batch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``batch`` options (shared by ``segmote batch`` and ``python -m pipeline``)."""
    p.add_argument("cohort", help="input cohort .zarr (docs/formats.md); opened read-only")
    p.add_argument("out", help="output labels .zarr (created, or resumed)")
    m = p.add_argument_group("model (default: the bundled demo model)")
    m.add_argument("--segmote-checkpoint", help="SegMoTE .safetensors (its .json beside it)")
    m.add_argument("--sam-checkpoint", help="official SAM .pth the SegMoTE weights sit on "
                                            "(default: the file recorded at training time, "
                                            "when it is still there)")
    m.add_argument("--allow-other-base", action="store_true",
                   help="load the SegMoTE weights on a SAM checkpoint whose sha256 differs from "
                        "the one they were trained on")
    m.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"],
                   help="SAM size when only --sam-checkpoint is given")
    m.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="encoder precision: auto = bf16 autocast where the hardware has "
                        "bf16 (CUDA compute capability >= 8.0: A100, L4, H100...; CPUs with "
                        "AVX512-BF16/AMX for vit_b/l/h), else fp32")
    s = p.add_argument_group("what to segment")
    s.add_argument("--mode", default="auto", choices=["auto", "box"],
                   help="auto: PPT, prompt-free; box: one box per slice around an existing "
                        "label array (re-segmentation)")
    s.add_argument("--label-key", default="labels",
                   help="label array of each case the boxes come from (--mode box)")
    s.add_argument("--label-id", type=int, default=None,
                   help="box around this id only (default: all ids > 0); written as this id")
    s.add_argument("--categories", nargs="+", default=(), metavar="NAME",
                   help="several structures per slice: one PPT pass per category of the model's "
                        "vocabulary (or 'all'), resolved into one label map (value = the "
                        "category's place in this list; the label table is in the attrs)")
    s.add_argument("--cases", nargs="+", default=(), metavar="CASE", help="only these case ids")
    s.add_argument("--skip-reviewed", action="store_true",
                   help="with a new model over an earlier run: re-segment only the cases nobody "
                        "reviewed (each old pre-label replaced atomically once its new one is "
                        "complete); reviewed cases and their corrections are never touched")
    s.add_argument("--overwrite", action="store_true",
                   help="replace labels made by another model/configuration in OUT")
    r = p.add_argument_group("Ray")
    r.add_argument("--address", default=None,
                   help="join this Ray cluster (HOST:PORT of `ray start --head`, or 'auto'); "
                        "default: a private local Ray started for this run")
    r.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray (default: all); ignored with --address")
    r.add_argument("--num-actors", type=int, default=None,
                   help="model replicas (default: one per GPU, or one per 4 CPUs)")
    r.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per actor, fractions allowed (default: 1 if the cluster has GPUs)")
    r.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs (torch threads) per actor (default: CPUs / actors; 1 on GPU)")
    r.add_argument("--batch-size", type=int, default=8, help="slices per actor call (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``batch`` to the ``segmote`` command (entry-point group ``segmote.commands``)."""
    p = subparsers.add_parser(
        "batch", help="segment a whole zarr cohort on Ray (PPT auto or boxes from labels)",
        description="Segment every case of COHORT.zarr into OUT.zarr on Ray. Rerun the same "
                    "command to resume: complete cases with the same model are skipped. "
                    "Exit code 1 if any case failed (see OUT/report.parquet).")
    add_arguments(p)
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    """Build :class:`pipeline.BatchOptions` from parsed arguments."""
    from .engine import PoolConfig
    from .runner import BatchOptions
    from .worker import ModelSpec

    return BatchOptions(
        cohort=args.cohort, out=args.out,
        model=ModelSpec(args.segmote_checkpoint, args.sam_checkpoint, args.model_type,
                        args.precision, args.allow_other_base),
        mode=args.mode, label_key=args.label_key, label_id=args.label_id,
        batch_size=args.batch_size,
        pool=PoolConfig(args.num_actors, args.gpus_per_actor, args.cpus_per_actor),
        address=args.address, num_cpus=args.num_cpus, cases=tuple(args.cases),
        overwrite=args.overwrite, skip_reviewed=args.skip_reviewed,
        progress=False if args.no_progress else None,
        categories=tuple(args.categories))


def check_model_args(args: argparse.Namespace) -> None:
    """Model files checked before Ray starts: the SegMoTE checkpoint is readable and its SAM
    base (given, or found where the checkpoint records it) is there with the recorded sha256;
    ``args.sam_checkpoint`` is set to the one the actors will load."""
    from pathlib import Path

    from segmote_core.build import resolve_sam_checkpoint

    from segmote_core.checkpoint import CheckpointError

    if args.segmote_checkpoint:
        try:
            sam = resolve_sam_checkpoint(args.segmote_checkpoint, args.sam_checkpoint,
                                         allow_other_base=args.allow_other_base)
        except CheckpointError as exc:
            raise CheckpointError(f"could not load the model: {exc}") from exc
        args.sam_checkpoint = str(sam) if sam is not None else None
    elif args.sam_checkpoint and not Path(args.sam_checkpoint).is_file():
        raise FileNotFoundError(f"--sam-checkpoint {args.sam_checkpoint}: no such file")


def run(args: argparse.Namespace) -> int:
    """Run ``segmote batch``; returns the exit code."""
    from segmote_core.locking import StoreLockedError

    from .engine import ModelLoadError
    from .runner import OutputStoreMismatchError, run_batch

    try:
        check_model_args(args)
        opts = options_from_args(args)
        summary = run_batch(opts)
    except (OutputStoreMismatchError, ModelLoadError, StoreLockedError, ValueError,
            OSError) as exc:
        from segmote_core.cli import user_error

        return user_error("batch", exc, getattr(args, "verbose", 0))
    except KeyboardInterrupt:
        log.error("interrupted: complete cases are kept; rerun the same command to resume")
        return 130
    lines = [
        f"segmote batch: {len(summary.rows)} case(s): {summary.count('done')} segmented, "
        f"{summary.count('skipped')} already complete, {summary.count('failed')} failed",
        f"  {summary.slices} slices in {summary.seconds:.1f} s: "
        f"{summary.slices_per_second:.2f} slices/s "
        f"(start-up {summary.startup_seconds:.1f} s for Ray + model, then "
        f"{summary.slices_per_second_after_startup:.2f} slices/s)",
        f"  report: {summary.report}",
        f"  review queue (lowest QC first): {summary.review_queue}",
    ]
    if summary.review_slices:
        lines.append(f"  slice queue (worst slices across the cases first): "
                     f"{summary.review_slices}")
    for row in summary.rows:
        if row["status"] == "failed":
            lines.append(f"  FAILED {row['case']}: {row['error']}")
    for case_id in summary.input_changed:
        lines.append(f"  CHANGED {case_id}: the input case was rewritten since its labels: "
                     f"segmented again")
    if summary.report_error:
        lines.append(f"  NO REPORT: {summary.report_error}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if summary.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline``: the same options as ``segmote batch``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return run(args)
