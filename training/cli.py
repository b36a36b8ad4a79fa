"""``segmote`` sub-commands of the training package (entry points in ``pyproject.toml``):
``curate`` and ``demo-data`` live here; ``train`` and ``evaluate`` in :mod:`training.commands`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from segmote_core.cli import summary, user_error

from .commands import register_evaluate, register_train

__all__ = ["register_curate", "register_demo_data", "register_train", "register_evaluate"]

log = logging.getLogger(__name__)


def register_demo_data(subparsers) -> None:
    """Add ``segmote demo-data OUT.zarr [--small] [--seed N]``."""
    p = subparsers.add_parser(
        "demo-data", help="write the offline demo cohort (MNI brain + CT / X-ray / skin phantoms)",
        description="Writes a labelled cohort (docs/formats.md), deterministic from --seed, "
                    "from the MNI "
                    "ICBM152 template inside the nilearn wheel plus generated phantoms "
                    "(docs/demo_data.md). Nothing is downloaded.")
    p.add_argument("out", type=Path, help="cohort to write (a new .zarr path)")
    p.add_argument("--small", action="store_true",
                   help="a tiny cohort (5 cases, a few slices) for tests and the quick start")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--datasets", nargs="*", default=None,
                   help="only these datasets (mni_brain ct_phantom xray_lungs derm_lesion)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing cohort (by default a same-seed run resumes)")
    p.set_defaults(func=run_demo_data)


def run_demo_data(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .demo_data import write_demo_cohort

    t0 = time.perf_counter()
    with tqdm(desc="demo-data", unit="case") as bar:
        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        try:
            result = write_demo_cohort(args.out, small=args.small, seed=args.seed,
                                        datasets=args.datasets, overwrite=args.overwrite,
                                        progress=tick)
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            return user_error("demo-data", exc, args.verbose)
    summary(f"segmote demo-data: {args.out}: {result['cases']} cases ("
            + ", ".join(f"{k} {v}" for k, v in result["per_dataset"].items())
            + f"), {result['written']} written now, in {time.perf_counter() - t0:.1f} s")
    return 0


def register_curate(subparsers) -> None:
    """Add ``segmote curate COHORT.zarr OUT [--keep 0.8] [--test-fraction 0.1] [--seed N]``."""
    p = subparsers.add_parser(
        "curate", help="score slices (MedSeg-HQ style), keep the best per dataset, split 9:1",
        description="Scores every labelled slice (clarity, contrast, entropy, foreground ratio, "
                    "connected regions), keeps the best --keep fraction per dataset and splits "
                    "patients train/test. OUT is a directory (selection.json, report.csv, "
                    "summary.json inside) or a .json file (the selection; report files beside "
                    "it). See docs/curation.md.")
    p.add_argument("cohort", type=Path, help="labelled cohort zarr (read only)")
    p.add_argument("out", type=Path, help="output directory, or the selection .json path")
    p.add_argument("--keep", type=float, default=0.8,
                   help="fraction of scored slices kept per dataset (default 0.8)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="fraction of patients held out per dataset (default 0.1, i.e. 9:1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    p.set_defaults(func=run_curate)


def run_curate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .curation import curate

    with tqdm(desc="curate", unit="case") as bar:
        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        try:
            result = curate(args.cohort, args.out, keep=args.keep,
                            test_fraction=args.test_fraction, seed=args.seed, progress=tick)
        except (FileNotFoundError, ValueError) as exc:       # CohortError is a ValueError
            return user_error("curate", exc, args.verbose)
    s = result.summary
    summary([f"segmote curate: kept {s['kept_slices']} of {s['scored_slices']} slices; "
             f"train {s['cases_train']} / test {s['cases_test']} cases",
             f"  selection: {result.paths['selection']}"]
            + [f"  {name}: {path}" for name, path in result.paths.items() if name != "selection"])
    return 0
