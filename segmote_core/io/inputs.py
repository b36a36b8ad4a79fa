"""What ``segmote ingest`` reads: the cases of a folder, a list file or a list of paths, each an
image with its labels (when found) and a case id; DICOM files grouped into one item per series.
See :mod:`segmote_core.io.ingest` for the rules (label pairing, list-file columns)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .dicom import find_dicom_files, is_dicom_file, scan_dicom
from .naming import case_id_from_path
from .naming import find_labels as _find_labels
from .naming import is_label_name as _is_label_name
from .readers import IMAGE_SUFFIXES, image_format

__all__ = ["IngestItem", "collect_inputs", "read_case_map"]


@dataclass(frozen=True)
class IngestItem:
    image: Path
    labels: Path | None
    case_id: str
    modality: str | None = None
    series: Any = field(default=None, compare=False, hash=False)   # a DicomSeries


# list-file header names -> column; a first line made only of such names is a header
_LIST_COLUMNS = {"image": "image", "images": "image", "img": "image", "path": "image",
                 "file": "image", "labels": "labels", "label": "labels", "mask": "labels",
                 "masks": "labels", "seg": "labels", "segmentation": "labels", "gt": "labels",
                 "case_id": "case_id", "case": "case_id", "id": "case_id",
                 "modality": "modality"}


def _read_list(path: Path) -> list[IngestItem]:
    """Rows ``image[,labels[,case_id[,modality]]]`` (comma or tab, csv quoting), or any order
    under a header naming the columns (``image``/``path``, ``label(s)``/``mask``/``seg``,
    ``case_id``/``case``, ``modality``). Raises ValueError naming the file and line."""
    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{path}: the list file names no images")
    delim = "\t" if "\t" in lines[0][1] else ","
    rows = [(n, [c.strip() for c in cells])
            for n, cells in zip((n for n, _ in lines), csv.reader((ln for _, ln in lines),
                                                                   delimiter=delim))]
    cols = ["image", "labels", "case_id", "modality"]
    names = [c.lower() for c in rows[0][1]]
    if any(c in _LIST_COLUMNS for c in names):
        unknown = [c for c in names if c and c not in _LIST_COLUMNS]
        if unknown:
            raise ValueError(f"{path}: line {rows[0][0]}: unknown column(s) {unknown} in the "
                             f"header; use image, labels, case_id, modality")
        cols = [_LIST_COLUMNS.get(c, "") for c in names]
        if "image" not in cols:
            raise ValueError(f"{path}: line {rows[0][0]}: the header has no image column")
        rows = rows[1:]
    items = []
    for n, cells in rows:
        row = dict(zip(cols, cells))
        if len(cells) > len(cols) and any(cells[len(cols):]):
            raise ValueError(f"{path}: line {n}: {len(cells)} columns, expected at most "
                             f"{len(cols)} ({', '.join(cols)})")
        if not row.get("image"):
            raise ValueError(f"{path}: line {n}: no image path")
        image = (path.parent / row["image"]).resolve()
        labels = (path.parent / row["labels"]).resolve() if row.get("labels") else None
        items.append(IngestItem(image, labels, row.get("case_id") or case_id_from_path(image),
                                row.get("modality") or None))
    return items


def collect_inputs(source: str | Path | Sequence[str | Path],
                   labels: str | Path | None = None,
                   case_map: dict[str, str] | None = None) -> list[IngestItem]:
    """The cases to ingest from a folder, a list file, or a sequence of image paths; DICOM
    files under a folder (or a DICOM file's own series) become one item per series, their case
    ids from ``case_map`` (SeriesInstanceUID -> case id) or derived from the UIDs."""
    label_dirs = [Path(labels)] if labels is not None else []
    dicom: list[Path] = []
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such folder or list file")
        fmt = image_format(src)
        if src.is_file() and fmt is None:
            return _read_list(src)
        if src.is_dir() and fmt != "zarr":
            paths = sorted(p for p in src.iterdir() if not p.name.startswith(".")
                           and image_format(p) not in (None, "dicom")
                           and not _is_label_name(p.name))
            label_dirs.append(src)
            dicom = find_dicom_files(src) if fmt == "dicom" else []
        elif fmt == "dicom":
            paths, dicom = [], _same_series(src)
            label_dirs.append(src.parent)
        else:
            paths = [src]
    else:
        paths = [Path(p) for p in source]
    items = []
    for p in paths:
        cid = case_id_from_path(p)
        items.append(IngestItem(p, _find_labels(p, cid, label_dirs), cid))
    for series in scan_dicom(dicom):
        cid = (case_map or {}).get(series.series_uid, series.case_id)
        series.case_id = cid
        lab = _find_labels(Path(f"{cid}.dicom-series"), cid, label_dirs) \
            if series.status == "image" else None
        items.append(IngestItem(series.where, lab, cid, series=series))
    if not items:
        raise ValueError(f"{source}: no images found (supported: {', '.join(IMAGE_SUFFIXES)})")
    return items


def _same_series(path: Path) -> list[Path]:
    """The DICOM files of ``path``'s folder that share its SeriesInstanceUID."""
    import pydicom

    def uid(p: Path) -> str:
        try:
            return str(pydicom.dcmread(p, stop_before_pixels=True, force=True,
                                       specific_tags=["SeriesInstanceUID"]).get(
                "SeriesInstanceUID", ""))
        except Exception:  # an unreadable neighbour is not this series
            return ""
    own = uid(path)
    return [p for p in sorted(path.parent.iterdir()) if p == path or (
        own and is_dicom_file(p) and uid(p) == own)]


def read_case_map(path: str | Path) -> dict[str, str]:
    """A user's case-id map: ``SeriesInstanceUID,case_id`` per line (csv, ``#`` comments, an
    optional header). Raises ValueError naming the file and line for a malformed row."""
    from .cohort import valid_case_id

    path = Path(path)
    out: dict[str, str] = {}
    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    for (n, _), cells in zip(lines, csv.reader(ln for _, ln in lines)):
        cells = [c.strip() for c in cells]
        if n == lines[0][0] and cells and cells[0].lower() in ("seriesinstanceuid", "series_uid",
                                                               "uid", "series"):
            continue
        if len(cells) != 2 or not all(cells):
            raise ValueError(f"{path}: line {n}: expected SeriesInstanceUID,case_id")
        try:
            out[cells[0]] = valid_case_id(cells[1])
        except ValueError as exc:
            raise ValueError(f"{path}: line {n}: {exc}") from None
    return out
