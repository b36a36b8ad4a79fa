"""``segmote ingest SOURCE COHORT``: images (a folder or a list file) into a cohort zarr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

__all__ = ["register", "run"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ingest", help="images (NIfTI, TIFF, PNG/JPEG, zarr, DICOM) into a cohort zarr",
        description="Ingest a folder (or a list file: image[,labels[,case_id[,modality]]] per "
                    "line) of medical images, optionally with ground-truth labels, into a cohort "
                    "zarr (one group per case). DICOM files anywhere under the folder become one "
                    "case per series (ids hashed from the UIDs; no patient attribute is copied). "
                    "Idempotent: complete cases from unchanged files "
                    "are skipped. Broken files are listed in the report; the rest are ingested. "
                    "Exit status 1 when any case failed, 2 when nothing could start (bad "
                    "arguments, another process writing the cohort).")
    p.add_argument("source", help="folder of images, or a list file")
    p.add_argument("cohort", help="output cohort .zarr (created if absent)")
    p.add_argument("--labels", "--labels-dir", dest="labels",
                   help="folder of ground-truth labels, paired by case id: the image's file "
                        "name, <case>.<suffix> (nnU-Net: imagesTr/pt000_0000.nii.gz with "
                        "labelsTr/pt000.nii.gz), or <case>_seg|_label|_labels|_mask|_gt.<suffix>; "
                        "a case without one is a warning")
    p.add_argument("--require-labels", action="store_true",
                   help="a case without a label file fails instead of a warning")
    p.add_argument("--modality", help="modality of every case (CT, MR, XR, DERM, ...); "
                                      "default: guessed per file")
    p.add_argument("--dataset", help="dataset name stored in every case's attrs")
    p.add_argument("--category", action="append", default=[], metavar="ID=NAME",
                   help="label category, e.g. --category 1=liver (repeatable)")
    p.add_argument("--auto-category", help="the union category PPT segments (binary datasets)")
    p.add_argument("--force", action="store_true", help="rewrite cases that are already complete")
    p.add_argument("--replace", action="store_true",
                   help="replace a case the cohort holds from another source file (without it "
                        "such a row fails, naming both files)")
    p.add_argument("--max-slice-mb", type=float, default=None, metavar="MB",
                   help="refuse images with a larger slice, read from the header before any "
                        "allocation (default 1024, or SEGMOTE_MAX_SLICE_MB)")
    p.add_argument("--max-volume-mb", type=float, default=None, metavar="MB",
                   help="refuse larger volumes (default 32768, or SEGMOTE_MAX_VOLUME_MB)")
    p.add_argument("--keep-uids", action="store_true",
                   help="DICOM: store the Study/Series/FrameOfReference/SOP instance UIDs in the "
                        "case attrs (needed to write DICOM-SEG back; no other DICOM attribute "
                        "that could identify a patient is stored)")
    p.add_argument("--case-map", metavar="CSV",
                   help="DICOM: SeriesInstanceUID,case_id per line (default ids: dcm-<hash of "
                        "the Study/SeriesInstanceUID>)")
    p.add_argument("--report-json", action="store_true", help="print the report as JSON lines")
    p.set_defaults(func=run)
    return p


def _categories(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, name = pair.partition("=")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise ValueError(f"--category expects ID=NAME with an integer id, got {pair!r}")
        out[str(int(key))] = name.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .io.ingest import ingest
    from .io.image import ReadLimits
    from .locking import StoreLockedError

    try:
        attrs: dict[str, Any] = {}
        if args.dataset:
            attrs["dataset"] = args.dataset
        if args.category:
            attrs["categories"] = _categories(args.category)
        if args.auto_category:
            attrs["auto_category"] = args.auto_category
        case_map = None
        if args.case_map:
            from .io.inputs import read_case_map

            case_map = read_case_map(args.case_map)
        bar = tqdm(total=0, unit="case", desc="ingest", disable=None)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            rep = ingest(args.source, args.cohort, labels=args.labels, modality=args.modality,
                         attrs=attrs, force=args.force, replace=args.replace,
                         limits=ReadLimits(args.max_slice_mb, args.max_volume_mb),
                         keep_uids=args.keep_uids, require_labels=args.require_labels,
                         case_map=case_map, progress=progress)
        finally:
            bar.close()
    except (OSError, ValueError, StoreLockedError) as exc:
        from .cli import user_error

        return user_error("ingest", exc, getattr(args, "verbose", 0))
    out = sys.stdout
    if args.report_json:
        for r in rep.records:
            out.write(json.dumps(r.__dict__) + "\n")
    c = rep.counts()
    usable = c["ingested"] + c["skipped"]
    out.write(f"{args.cohort}: {c['ingested']} ingested, {c['skipped']} skipped, "
              f"{c['failed']} failed; labels for {rep.labelled} of {usable} cases\n")
    for r in rep.warnings:
        out.write(f"WARNING {r.case_id}: {r.warning}\n")
    for r in rep.failed:
        out.write(f"FAILED {r.case_id}: {r.error}\n")
    for r in rep.records:
        if r.note:
            out.write(f"NOTE {r.case_id}: {r.note}\n")
    return 0 if rep.ok else 1
