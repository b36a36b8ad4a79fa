"""``segmote ingest``: a folder or list file of images (optionally with ground-truth labels) into a
cohort zarr (docs/formats.md), one group per case.

- Idempotent: a case already in the cohort, complete, from the same source files (path, size and
  modification time) is skipped; an interrupted case (``complete`` false) is rewritten.
- A broken input (corrupt, truncated, empty, 4D, NaN-filled, wrong dtype, labels not matching the
  image) is recorded by name with its problem in the report and the other cases still complete.
- Labels are paired by case id: ``<labels_dir>/<name>`` with the image's own file name, or
  ``<case>_seg|_label|_labels|_mask|_gt`` with any supported suffix (also beside the images, where
  such files are taken as labels, not as images). nnU-Net's channel suffix ``_0000`` is dropped
  from the case id. A list file holds one case per line: ``image[,labels[,case_id[,modality]]]``
  (comma or tab separated, csv quoting, ``#`` comments, paths relative to the list file), or
  any column order under a header line naming them (synonyms: :mod:`segmote_core.io.inputs`).
- DICOM files anywhere under the source folder are grouped by series: one case per
  SeriesInstanceUID, its id a hash of the Study/SeriesInstanceUID (or from a user's map file);
  localizers, DICOMDIRs and non-image objects are listed as skipped with a note. No patient
  attribute is copied; ``keep_uids`` stores the UIDs a DICOM-SEG needs (docs/medical_io.md).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_write_text
from ..locking import StoreLock
from ..progress import CancelToken, Cancelled, ProgressCallback, report
from .cohort import create_cohort, open_cohort, valid_case_id, write_case
from .image import ImageReadError, ReadLimits, read_limits
from .dicom import read_series
from .inputs import IngestItem, collect_inputs
from .naming import LABEL_TAGS as _LABEL_TAGS
from .naming import case_id_from_path, label_candidates  # noqa: F401  (public here too)
from .readers import open_image

__all__ = ["IngestItem", "IngestRecord", "IngestReport", "collect_inputs", "ingest",
           "case_id_from_path", "report_path"]

log = logging.getLogger(__name__)

REPORT_SUFFIX = ".ingest_report.csv"   # beside the cohort: cohort.zarr.ingest_report.csv


@dataclass
class IngestRecord:
    case_id: str
    image: str
    labels: str
    status: str          # "ingested" | "skipped" | "failed"
    error: str = ""
    seconds: float = 0.0
    shape: str = ""
    note: str = ""
    warning: str = ""    # e.g. no label file found while labels were asked for


@dataclass
class IngestReport:
    cohort: str
    records: list[IngestRecord] = field(default_factory=list)

    @property
    def failed(self) -> list[IngestRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out = {"ingested": 0, "skipped": 0, "failed": 0}
        for r in self.records:
            out[r.status] += 1
        return out

    @property
    def labelled(self) -> int:
        """Cases in the cohort after this run (ingested or skipped) that have a label file."""
        return sum(1 for r in self.records if r.labels and r.status != "failed")

    @property
    def warnings(self) -> list[IngestRecord]:
        return [r for r in self.records if r.warning]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(IngestRecord.__dataclass_fields__))
        writer.writeheader()
        for r in self.records:
            writer.writerow(asdict(r))
        return buf.getvalue()


def _signature(item: IngestItem) -> list[Any]:
    sig: list[Any] = []
    for p in (item.image, item.labels):
        if p is None:
            sig.append(None)
            continue
        if p is item.image and item.series is not None:
            sig.append(item.series.signature())
            continue
        st = p.stat()
        sig.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return sig


def _label_data(path: Path, image_shape: tuple[int, ...]) -> Any:
    lab = open_image(path, modality="labels")
    data = lab.data
    if lab.axes == "YXC":  # an RGB mask: grey only if its channels agree
        arr = np.asarray(data)
        if not (arr == arr[..., :1]).all():
            raise ImageReadError(path, "labels are an RGB image with differing channels; "
                                       "expected one integer id per pixel")
        data = arr[..., 0]
    if tuple(data.shape) != tuple(image_shape):
        raise ImageReadError(path, f"labels shape {tuple(data.shape)} differs from the image "
                                   f"shape {tuple(image_shape)}")
    if np.dtype(data.dtype).kind == "f":
        data = data.map_blocks(_integral, path=str(path), dtype=np.uint16) if hasattr(
            data, "map_blocks") else _integral(np.asarray(data), str(path))
    if lab.meta.get("format") == "pil" and np.dtype(data.dtype) == np.uint8:
        arr = np.asarray(data)
        if set(np.unique(arr).tolist()) <= {0, 255}:  # a 0/255 binary mask (ISIC style) -> 0/1
            data = (arr > 0).astype(np.uint8)
    return data


def _integral(block: np.ndarray, path: str) -> np.ndarray:
    if not np.isfinite(block).all() or (block != np.round(block)).any() or block.min(initial=0) < 0:
        raise ImageReadError(path, "labels hold non-integer, negative or NaN values")
    if block.max(initial=0) > 65535:
        raise ImageReadError(path, "label ids above 65535")
    return block.astype(np.uint16)


def _ingest_one(item: IngestItem, cohort: Path, modality: str | None, attrs: dict[str, Any],
                cancel: CancelToken | None, keep_uids: bool = False) -> str:
    if item.series is not None:
        img = read_series(item.series, modality=item.modality or modality)
    else:
        img = open_image(item.image, modality=item.modality or modality)
    spatial = img.shape[:2] if img.axes == "YXC" else img.shape
    labels = _label_data(item.labels, spatial) if item.labels is not None else None
    extra = {**attrs, "source": str(item.image), "labels_source": str(item.labels or ""),
             "source_signature": _signature(item), "source_format": img.meta.get("format"),
             "orientation": img.meta.get("orientation")}
    if item.series is not None:  # only non-identifying facts (docs/medical_io.md)
        extra.update({"dicom": img.meta["dicom"], "window": img.meta.get("window")})
        if keep_uids:
            extra["dicom_uids"] = img.meta["dicom_uids"]
    write_case(cohort, item.case_id, img.data, spacing=img.spacing, affine=img.affine,
               modality=img.modality, labels=labels, attrs=extra, axes=img.axes, cancel=cancel,
               source=item.image)
    return "x".join(str(s) for s in img.shape)


def _one_writer(fn: Any) -> Any:
    """Hold the cohort's lock (:mod:`segmote_core.locking`) for the whole ingest: a second
    ingest, or any other writer, is refused with :class:`StoreLockedError` naming the holder."""
    import functools

    @functools.wraps(fn)
    def locked(source: Any, cohort: str | Path, *, limits: ReadLimits | None = None,
               **kwargs: Any) -> Any:
        with StoreLock(cohort, "segmote ingest"), read_limits(limits):
            return fn(source, cohort, **kwargs)
    return locked


@_one_writer
def ingest(source: str | Path | Sequence[str | Path], cohort: str | Path, *,
           labels: str | Path | None = None, modality: str | None = None,
           attrs: dict[str, Any] | None = None, force: bool = False, replace: bool = False,
           keep_uids: bool = False, case_map: dict[str, str] | None = None,
           require_labels: bool = False, progress: ProgressCallback | None = None,
           cancel: CancelToken | None = None) -> IngestReport:
    """Ingest images into the cohort at ``cohort`` (created if absent); never raises for a bad case.

    Args:
        source: a folder, a list file, or a sequence of image paths.
        labels: a folder of ground-truth label files paired by case id.
        modality: for every case (default: guessed per file, or the list file's column).
        attrs: extra case attributes (``dataset``, ``categories``, ...).
        force: rewrite cases that are already complete (from the same source).
        replace: rewrite a complete case from another source file than the one it was ingested
            from (without it, such a row fails naming both files).
        limits: size budgets for every image read (:class:`~segmote_core.io.image.ReadLimits`).
        keep_uids: store a DICOM series' Study/Series/FrameOfReference/SOP instance UIDs (what
            a DICOM-SEG written back must reference) in the case attrs.
        case_map: SeriesInstanceUID -> case id for DICOM series (default: a hash of the UIDs).
        require_labels: a case without a label file fails (by default, with ``labels`` given,
            it is ingested with a warning in its record).
        progress: ``progress(done_cases, total_cases)``.
    Returns:
        The report, also written beside the cohort (``<cohort>.ingest_report.csv``; zarr
        would flag a foreign file inside the store) and summarised in the cohort's attrs.
    Raises:
        Cancelled: once ``cancel`` is set (the case in progress stays incomplete; rerun resumes).
        StoreLockedError: another process writes the cohort (the message names it).
    """
    cohort = Path(cohort)
    out = cohort.resolve()
    items = [it for it in collect_inputs(source, labels, case_map)
             if it.image.resolve() != out]
    create_cohort(cohort)           # after the inputs parsed: a bad list file creates nothing
    report_ = IngestReport(str(cohort))
    existing = open_cohort(cohort)
    done_ids = set(existing.case_ids())
    seen: dict[str, Path] = {}
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        rec = IngestRecord(item.case_id, str(item.image), str(item.labels or ""), "ingested",
                           note="; ".join(item.series.notes) if item.series is not None else "")
        try:
            valid_case_id(item.case_id)   # this row only: '..', 'report.parquet', ...
            if item.series is not None and item.series.status == "failed":
                raise ImageReadError(item.image, item.series.reason)
            if item.series is not None and item.series.status == "ignored":
                # a DICOMDIR, SR, RTSTRUCT, ..., or a localizer series: nothing to segment
                rec.status, rec.note = "skipped", f"{item.image}: {item.series.reason}"
                log.info("ingest: skipped %s", rec.note)
            elif item.case_id in seen:
                raise ImageReadError(item.image, f"case id {item.case_id!r} already used by "
                                                 f"{seen[item.case_id]}")
            else:
                seen[item.case_id] = item.image
                if item.labels is None and (labels is not None or require_labels):
                    _missing_labels(rec, item, labels, require_labels)
                if (not force and item.case_id in done_ids and
                        existing.case(item.case_id).attrs.get("source_signature") ==
                        _jsonable(_signature(item))):
                    rec.status = "skipped"
                else:
                    if item.case_id in done_ids and not replace:
                        _same_source_or_refuse(existing, item)
                    rec.shape = _ingest_one(item, cohort, modality, attrs or {}, cancel,
                                            keep_uids)
        except Cancelled:
            raise
        except (ImageReadError, ValueError, TypeError, OSError) as exc:
            rec.status, rec.error = "failed", str(exc)
            log.error("ingest %s failed: %s", item.image, exc)
            _drop_incomplete(cohort, item.case_id)
        rec.seconds = round(time.perf_counter() - t0, 3)
        report_.records.append(rec)
        report(progress, i + 1, len(items), cancel)
    _write_report(cohort, report_)
    c = report_.counts()
    log.info("ingest into %s: %d ingested, %d skipped, %d failed; %d with labels", cohort,
             c["ingested"], c["skipped"], c["failed"], report_.labelled)
    return report_


def _missing_labels(rec: IngestRecord, item: IngestItem, labels: str | Path | None,
                    required: bool) -> None:
    """No label file for this case: an error with ``require_labels``, else a warning."""
    where = f"in {labels}" if labels is not None else "in its row or beside it"
    msg = (f"no label file for case {item.case_id!r} {where} (tried the same file name, "
           f"{item.case_id}.<suffix> and {item.case_id}" + "|".join(_LABEL_TAGS) + ".<suffix>)")
    if required:
        raise ImageReadError(item.image, msg)
    rec.warning = msg


def _same_source_or_refuse(existing: Any, item: IngestItem) -> None:
    """A complete case is only rewritten from the source it was ingested from (``--replace``
    lifts this): two folders holding ``a.nii.gz`` must not silently overwrite each other."""
    old = existing.case(item.case_id).attrs.get("source")
    if old and Path(str(old)).resolve() == Path(item.image).resolve():
        return
    raise ValueError(f"{existing.path}/{item.case_id}: the cohort already holds case "
                     f"{item.case_id!r} from {old or 'an unrecorded source'}; this row's image "
                     f"is {item.image}: pass --replace to replace it, or give the row another "
                     f"case id")


def _drop_incomplete(cohort: Path, case_id: str) -> None:
    """Remove a case group that a failed write left incomplete (it holds no usable data)."""
    import zarr

    try:
        valid_case_id(case_id)
    except ValueError:  # never a path into (or out of) the store
        return

    root = zarr.open_group(str(cohort), mode="r+")
    if case_id in root and dict(root[case_id].attrs).get("complete") is False:
        del root[case_id]


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def report_path(cohort: str | Path) -> Path:
    """Where :func:`ingest` writes its CSV report for ``cohort``."""
    cohort = Path(cohort)
    return cohort.with_name(cohort.name + REPORT_SUFFIX)


def _write_report(cohort: Path, rep: IngestReport) -> None:
    import zarr

    out = report_path(cohort)
    atomic_write_text(out, rep.to_csv())
    root = zarr.open_group(str(cohort), mode="r+")
    root.attrs["last_ingest"] = {**rep.counts(), "labelled": rep.labelled, "report": out.name,
                                 "failed": {r.case_id: r.error for r in rep.failed}}
