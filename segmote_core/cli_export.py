"""``segmote export OUT.zarr DEST_DIR``: a batch output's labels (reviewed corrections first) as
NIfTI / TIFF / PNG / DICOM-SEG files in the source geometry, with ``labels.csv``."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    from .export import FORMATS

    p = subparsers.add_parser(
        "export", help="labels of a segmote batch output (reviewed where corrected) as files",
        description="Write every complete case of a segmote batch output store: its reviewed "
                    "correction (saved by the napari Review panel) where there is one, else the "
                    "pre-label, in the geometry of the cohort's source image (NIfTI: nibabel, "
                    "ITK-SNAP and 3D Slicer read back the source's shape and affine), plus "
                    "labels.csv (value, category, case, source: pre-label | reviewed, file). "
                    "The output store and the cohort are only read. Exit status 1 when a case "
                    "could not be exported (named on stderr), 2 when nothing could start.")
    p.add_argument("out", help="output store of segmote batch (OUT.zarr)")
    p.add_argument("dest", help="folder to write the label files and labels.csv into")
    p.add_argument("--format", dest="fmt", default="nifti", choices=sorted(FORMATS),
                   help="nifti (default, every case); tiff or png for 2D images (volumes are "
                        "still written as NIfTI, the format that keeps their geometry); "
                        "dicom-seg for cases ingested from DICOM")
    p.add_argument("--cases", nargs="+", metavar="CASE", help="only these cases")
    p.add_argument("--corrections", metavar="DIR",
                   help="where the Review panel saved corrections (default OUT.zarr/corrections)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from .cli import summary
    from .export import export_store

    bar = tqdm(desc="cases", unit="case", disable=True if args.no_progress else None,
               file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        res = export_store(args.out, args.dest, fmt=args.fmt, cases=args.cases,
                           corrections=args.corrections, progress=progress)
    finally:
        bar.close()
    reviewed = sum(s == "reviewed" for s in res.sources.values())
    for case, msg in sorted(res.errors.items()):
        sys.stderr.write(f"segmote export: error: {msg}\n")
    summary([f"segmote export: {len(res.written)} case(s) written to {args.dest} "
             f"({reviewed} reviewed, {len(res.written) - reviewed} pre-label), "
             f"{len(res.errors)} failed",
             f"  labels: {res.csv}"])
    return 0 if res.ok else 1
