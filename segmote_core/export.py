"""``segmote export OUT.zarr DEST``: a batch output's labels as files other tools open.

Every complete case is written once: its reviewed correction where there is one
(:mod:`segmote_core.review`), else the pre-label. Volumes become NIfTI in the source geometry
(the cohort's affine and axis order, so nibabel, ITK-SNAP and 3D Slicer read back the source
file's shape and affine, oblique and LPS sources included); 2D images NIfTI, TIFF or PNG
(``--format``); ``dicom-seg`` writes one DICOM-SEG per case ingested from DICOM. Beside them,
``labels.csv`` lists ``value, category, case, source, file`` (source: ``pre-label`` or
``reviewed``). The output store and the cohort are only read.

Formats are a table (:data:`FORMATS`): a new one is a writer function and a name.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .fileio import atomic_write_text
from .review import OutputStore, OutputStoreError, open_output, read_correction

__all__ = ["ExportResult", "export_store", "FORMATS", "Writer"]

log = logging.getLogger(__name__)


@dataclass
class Writer:
    """How one format writes a case: ``write(labels, dest_without_suffix, case, categories)``
    returns the written path. ``volumes``: whether it takes (Z, Y, X) labels (else volumes go
    to NIfTI, the one format here that keeps their geometry)."""

    suffix: str
    write: Callable[[np.ndarray, Path, Any, dict[int, str]], Path]
    volumes: bool = True


def _write_with_writers(labels: np.ndarray, dest: Path, case: Any, suffix: str) -> Path:
    from .io.writers import write_labels

    return write_labels(labels, dest.with_name(dest.name + suffix), affine=case.affine,
                        spacing=case.spacing, modality=case.modality)


def _nifti(labels, dest, case, categories):
    return _write_with_writers(labels, dest, case, ".nii.gz")


def _tiff(labels, dest, case, categories):
    return _write_with_writers(labels, dest, case, ".tif")


def _png(labels, dest, case, categories):
    return _write_with_writers(labels, dest, case, ".png")


def _dicom_seg(labels, dest, case, categories):
    from .io.dicom_seg import write_dicom_seg

    # the source series where it still is (the SEG then copies its patient and study module),
    # else the UIDs kept at ingest (the SEG still lands on the right slices)
    folder = case.attrs.get("source")
    uids = case.attrs.get("dicom_uids")
    if folder and Path(folder).exists() and (uids or Path(folder).is_dir()):
        source, like = folder, None
    elif uids:
        source, like = uids, case.as_image()
    else:
        raise OutputStoreError(f"{case.source}: not ingested from DICOM (no source series or "
                               "kept UIDs): DICOM-SEG needs one; use --format nifti")
    return write_dicom_seg(labels, dest.with_name(dest.name + ".seg.dcm"), source,
                           categories=categories, like=like, manual=False)


FORMATS: dict[str, Writer] = {
    "nifti": Writer(".nii.gz", _nifti),
    "tiff": Writer(".tif", _tiff, volumes=False),
    "png": Writer(".png", _png, volumes=False),
    "dicom-seg": Writer(".seg.dcm", _dicom_seg),
}


@dataclass
class ExportResult:
    """What :func:`export_store` wrote and what it could not."""

    written: dict[str, Path] = field(default_factory=dict)   # case -> file
    sources: dict[str, str] = field(default_factory=dict)    # case -> pre-label | reviewed
    errors: dict[str, str] = field(default_factory=dict)     # case -> message
    csv: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def _categories(case: Any, values: list[int], pre_attrs: dict[str, Any]) -> dict[int, str]:
    """Names of the label values: the label table of a ``--categories`` run, else the cohort's
    categories, or the auto target for PPT's 1."""
    cats = {int(k): str(v) for k, v in (case.attrs.get("categories") or {}).items()}
    table = {int(k): str(v) for k, v in (pre_attrs.get("label_table") or {}).items()}
    out = {}
    for v in values:
        if table:
            out[v] = table.get(v, f"label {v}")
            continue
        if pre_attrs.get("mode") == "auto" and v == 1 and case.attrs.get("auto_category"):
            out[v] = str(case.attrs["auto_category"])
        else:
            out[v] = cats.get(v, f"label {v}")
    return out


def export_store(out: str | Path, dest: str | Path, *, fmt: str = "nifti",
                 cases: list[str] | None = None, corrections: str | Path | None = None,
                 progress: Any = None) -> ExportResult:
    """Export every complete case of ``out`` (or ``cases``) to ``dest`` (module docstring).

    ``corrections``: the folder the Review panel saved to when not ``<out>/corrections``.
    A case that cannot be exported (incomplete, unreadable, wrong shape for its image) is
    listed in ``result.errors`` naming it; the others are written.

    Raises:
        OutputStoreError: ``out`` is not an output store, its cohort is missing, an unknown
            case was asked for, an unknown format.
    """
    if fmt not in FORMATS:
        raise OutputStoreError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
    store = open_output(out, corrections)
    cohort = store.open_cohort()
    dest = Path(dest).resolve()
    if dest == store.path.resolve() or store.path.resolve() in dest.parents:
        raise OutputStoreError(f"{dest}: the export goes beside the output store, not into it")
    every = store.case_ids(include_incomplete=True)
    chosen = list(cases) if cases else every
    unknown = sorted(set(chosen) - set(every))
    if unknown:
        raise OutputStoreError(f"{store.path}: no case(s) {', '.join(unknown)}")
    dest.mkdir(parents=True, exist_ok=True)
    result = ExportResult()
    rows = []
    for i, case_id in enumerate(chosen):
        try:
            rows += _export_case(store, cohort, case_id, dest, FORMATS[fmt], result)
        except Exception as exc:  # noqa: BLE001 - one bad case never stops the others
            msg = str(exc) if isinstance(exc, (OutputStoreError, ValueError, OSError)) else \
                f"{type(exc).__name__}: {exc}"
            if case_id not in msg:
                msg = f"{store.path}/{case_id}: {msg}"
            result.errors[case_id] = msg
            log.error("%s", msg)
        if progress is not None:
            progress(i + 1, len(chosen))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["value", "category", "case", "source", "file"])
    w.writerows(rows)
    result.csv = atomic_write_text(dest / "labels.csv", buf.getvalue())
    return result


def _export_case(store: OutputStore, cohort: Any, case_id: str, dest: Path, writer: Writer,
                 result: ExportResult) -> list[list[Any]]:
    pre = store.prelabels(case_id)  # raises naming the case when incomplete
    try:
        case = cohort.case(case_id)
    except Exception as exc:  # noqa: BLE001 - CohortError and zarr errors
        raise OutputStoreError(f"{store.path}/{case_id}: its image is not in the cohort "
                               f"{store.cohort_path}: {exc}") from exc
    got = read_correction(store, case_id)
    if got is not None:
        labels, source = got[0], "reviewed"
    else:
        labels, source = np.asarray(pre[...]), "pre-label"
    spatial = tuple(case.image.shape[:2]) if case.axes == "YXC" else tuple(case.image.shape)
    if tuple(labels.shape) != spatial:
        raise OutputStoreError(f"{store.path}/{case_id}: labels of shape {labels.shape} do not "
                               f"fit the cohort image {case.source} of shape {spatial}")
    use = writer if (labels.ndim == 2 or writer.volumes) else FORMATS["nifti"]
    values = [int(v) for v in np.unique(labels) if v > 0]
    categories = _categories(case, values, dict(pre.attrs))
    path = use.write(labels, dest / case_id, case, categories)
    result.written[case_id] = path
    result.sources[case_id] = source
    return [[v, categories[v], case_id, source, path.name] for v in values]
