"""The morning after a batch run: the review queue and the corrections store (no Qt, no Ray).

An output store of ``segmote batch`` (``OUT.zarr``) holds one pre-label array per case, signed,
with per-slice QC, and records the cohort it came from. A reviewer corrects cases worst first;
each saved correction goes to ``OUT.zarr/corrections/<case>`` (a zarr group of its own, not a
member of the output's hierarchy, so reruns of the batch never see or delete it)::

    corrections/<case>/labels   same shape and dtype as the pre-label; attrs: reviewed: true,
                                prelabel_signature (the pre-label's signature sha256), edited_slices,
                                saved_at (UTC ISO time), saved_by, segmote_version, complete: true
                                (written last)

A save is atomic: the new group is written and synced beside the old one, then renamed over it
(:func:`segmote_core.fileio.atomic_write_dir`), with the output store's lock held for the
moment of the save. A reader sees the old correction or the new one, never part of one: a
process killed between the two renames leaves the old one under its ``.old`` name, and
:func:`read_correction` reads it from there (the next save cleans it up).
"""

from __future__ import annotations

import getpass
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fileio import atomic_write_dir

__all__ = ["OutputStoreError", "OutputStore", "open_output", "QueueEntry", "review_queue",
           "SliceEntry", "slice_queue",
           "read_correction", "save_correction", "edited_slices", "describe", "CORRECTIONS"]

log = logging.getLogger(__name__)

CORRECTIONS = "corrections"


class OutputStoreError(ValueError):
    """Not a batch output store, a missing cohort, or a case that cannot be used (the message
    names the path, the case and the problem)."""


def _qc_value(v: Any) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


@dataclass
class OutputStore:
    """A read-only view of ``OUT.zarr`` (:func:`open_output`)."""

    path: Path
    root: Any
    attrs: dict[str, Any]
    corrections_root: Path | None = None  # default: ``<out>/corrections``

    @property
    def cohort_path(self) -> Path:
        """Where the store says its cohort is (as recorded by ``segmote batch``)."""
        recorded = self.attrs.get("cohort")
        if not recorded:
            raise OutputStoreError(f"{self.path}: the store does not record its cohort")
        return Path(recorded)

    def open_cohort(self) -> Any:
        """The cohort the pre-labels were made from. Raises :class:`OutputStoreError` saying
        where it looked when it has moved."""
        from .io import CohortError, open_cohort

        where = self.cohort_path
        try:
            return open_cohort(where)
        except (CohortError, OSError) as exc:
            raise OutputStoreError(
                f"{self.path}: its cohort is not where the store records it ({where}): {exc}. "
                "Move the cohort back there (or the output beside it)") from exc

    def case_ids(self, include_incomplete: bool = False) -> list[str]:
        """Cases with pre-labels (complete ones unless asked), sorted."""
        with warnings.catch_warnings():  # corrections/ and the report are not zarr members
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            groups = list(self.root.groups())
        out = []
        for name, group in groups:
            if include_incomplete or self.is_complete(name, group):
                out.append(name)
        return sorted(out)

    def is_complete(self, case_id: str, group: Any = None) -> bool:
        try:
            group = self.root[case_id] if group is None else group
            return dict(group["labels"].attrs).get("complete") is True
        except Exception:  # noqa: BLE001 - absent or unreadable metadata: not complete
            return False

    def prelabels(self, case_id: str) -> Any:
        """The case's pre-label array (zarr). Raises naming the case when absent or incomplete."""
        if case_id not in self.case_ids(include_incomplete=True):
            raise OutputStoreError(f"{self.path}: no case {case_id!r}")
        if not self.is_complete(case_id):
            raise OutputStoreError(f"{self.path}/{case_id}: the pre-label is incomplete (the "
                                   "batch run did not finish it); rerun segmote batch")
        return self.root[case_id]["labels"]

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self.prelabels(case_id).attrs)

    def qc(self, case_id: str) -> list[float]:
        """Per-slice QC of a case (NaN where nothing was segmented)."""
        return [_qc_value(v) for v in self.case_attrs(case_id).get("qc") or []]

    @property
    def corrections(self) -> Path:
        """Where corrections are saved and read: ``<out>/corrections`` or the folder chosen."""
        return self.corrections_root or self.path / CORRECTIONS


def open_output(path: str | Path, corrections: str | Path | None = None) -> OutputStore:
    """Open a ``segmote batch`` output store read-only.

    ``corrections``: a folder of one's choice for the corrections (default
    ``<out>/corrections``), e.g. when the output store is on read-only media.

    Raises:
        OutputStoreError: no such path, not a zarr store, or a zarr store of another kind (a
            cohort, say), naming the path.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise OutputStoreError(f"{path}: no such output store")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types
        raise OutputStoreError(f"{path}: not a zarr store ({type(exc).__name__}: {exc})") from exc
    attrs = dict(root.attrs)
    kind = (attrs.get("segmote") or {}).get("kind")
    if kind != "labels":
        what = f"a SegMoTE {kind}" if kind else "not a SegMoTE store"
        raise OutputStoreError(f"{path}: not an output store of segmote batch ({what}); give "
                               "the OUT.zarr that segmote batch wrote")
    return OutputStore(path, root, attrs, Path(corrections) if corrections else None)


# ------------------------------------------------------------------------------ queue
@dataclass
class QueueEntry:
    """One case of the review queue."""

    rank: int
    case: str
    qc: float
    worst_slices: list[int] = field(default_factory=list)
    reviewed: bool = False

    @property
    def status(self) -> str:
        return "reviewed" if self.reviewed else "pending"


def review_queue(out: str | Path | OutputStore) -> list[QueueEntry]:
    """The cases of ``out`` in review order (``review_queue.csv``: lowest QC first), each with
    its status read from the corrections store, so the queue is the same after a restart.
    Complete cases missing from the CSV (a store written without it) follow, by QC."""
    import csv

    store = out if isinstance(out, OutputStore) else open_output(out)
    complete = store.case_ids()
    entries: list[QueueEntry] = []
    seen: set[str] = set()
    csv_path = store.path / "review_queue.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                case = row.get("case", "")
                if case not in complete or case in seen:
                    continue
                worst = [int(z) for z in (row.get("worst_slices") or "").split()]
                entries.append(QueueEntry(len(entries) + 1, case, _qc_value(row.get("qc")), worst))
                seen.add(case)
    rest = []
    for case in complete:
        if case not in seen:
            from .qc import case_qc, worst_slices

            qc = store.qc(case)
            rest.append(QueueEntry(0, case, case_qc(qc), worst_slices(qc)))
    rest.sort(key=lambda e: (not math.isnan(e.qc), e.qc if not math.isnan(e.qc) else 0, e.case))
    for e in rest:
        e.rank = len(entries) + 1
        entries.append(e)
    for e in entries:
        e.reviewed = read_correction(store, e.case, data=False) is not None
    return entries


@dataclass
class SliceEntry:
    """One slice of the cohort's slice queue (``review_slices.csv``)."""

    rank: int
    case: str
    slice: int
    qc: float


def slice_queue(out: str | Path | OutputStore) -> list[SliceEntry]:
    """Single slices of the complete cases, lowest QC first (likely misses first), as
    :func:`segmote_core.qc.slice_review_order` ranks them, from the QC stored with each case
    (the same values ``review_slices.csv`` is written from). Whether a slice's case is reviewed
    is the case queue's to say (:func:`review_queue`)."""
    from .qc import slice_review_order

    store = out if isinstance(out, OutputStore) else open_output(out)
    order = slice_review_order({case: store.qc(case) for case in store.case_ids()})
    return [SliceEntry(i + 1, c, z, v) for i, (c, z, v) in enumerate(order)]


# ------------------------------------------------------------------------------ corrections
def _correction_dir(store: OutputStore, case_id: str) -> Path:
    from .io import valid_case_id

    return store.corrections / valid_case_id(case_id)


def _read_group(path: Path, data: bool) -> tuple[np.ndarray | None, dict[str, Any]] | None:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        arr = group["labels"]
        attrs = dict(arr.attrs)
    except Exception:  # noqa: BLE001 - absent or unreadable: no correction there
        return None
    if attrs.get("complete") is not True:
        return None
    return (np.asarray(arr[...]) if data else None), attrs


def read_correction(out: str | Path | OutputStore, case_id: str, *, data: bool = True
                    ) -> tuple[np.ndarray | None, dict[str, Any]] | None:
    """The saved correction of a case (labels, attrs), or ``None`` when it has none.

    Only a correction whose ``complete`` flag is set counts; when a save was killed between
    its two renames the previous correction is read from its ``.old`` name beside.
    """
    store = out if isinstance(out, OutputStore) else open_output(out)
    path = _correction_dir(store, case_id)
    got = _read_group(path, data)
    if got is not None or path.exists():
        return got
    for old in sorted(store.corrections.glob(f".{case_id}.*.old")):
        got = _read_group(old, data)
        if got is not None:
            return got
    return None


def edited_slices(before: np.ndarray, after: np.ndarray) -> list[int]:
    """Indices of the slices that differ (``[0]`` for a changed 2D image)."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {before.shape} vs {after.shape}")
    if before.ndim == 2:
        return [0] if not np.array_equal(before, after) else []
    diff = (before != after).reshape(len(before), -1).any(1)
    return [int(z) for z in np.flatnonzero(diff)]


def save_correction(out: str | Path | OutputStore, case_id: str, labels: np.ndarray, *,
                    edited: Sequence[int] | None = None, lock: bool = True) -> Path:
    """Write the reviewed labels of a case to ``OUT/corrections/<case>`` (module docstring).

    Args:
        labels: the corrected labels, the pre-label's shape; stored in its dtype when they fit.
        edited: the slices changed from the pre-label (default: computed against it).
        lock: hold the output store's lock while saving (another writer gets a clear error).
    Returns:
        the correction's folder.
    Raises:
        OutputStoreError: not an output store, no such complete case, wrong shape.
        StoreLockedError: another process writes the store.
    """
    import zarr

    from . import __version__
    from .locking import StoreLock

    store = out if isinstance(out, OutputStore) else open_output(out)
    pre = store.prelabels(case_id)
    labels = np.asarray(labels)
    if labels.shape != tuple(pre.shape):
        raise OutputStoreError(f"{store.path}/{case_id}: corrected labels of shape "
                               f"{labels.shape} do not match the pre-label's {tuple(pre.shape)}")
    if labels.dtype.kind not in "biu" or (labels.size and (labels.min() < 0)):
        raise OutputStoreError(f"{store.path}/{case_id}: labels must be non-negative integers")
    dtype = np.dtype(pre.dtype)
    if labels.size and labels.max() > np.iinfo(dtype).max:
        dtype = np.dtype(np.uint16 if labels.max() <= 65535 else np.uint32)
    pre_attrs = dict(pre.attrs)
    if edited is None:
        edited = edited_slices(np.asarray(pre[...]), labels)
    attrs = {"reviewed": True, "prelabel_signature": pre_attrs.get("signature_sha256"),
             "edited_slices": sorted(int(z) for z in edited),
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "saved_by": _user(), "segmote_version": __version__}

    def write(tmp: str) -> None:
        group = zarr.open_group(tmp, mode="w")
        chunks = (1, *labels.shape[1:]) if labels.ndim == 3 else labels.shape
        arr = group.create_array("labels", shape=labels.shape, dtype=dtype, chunks=chunks,
                                 fill_value=0)
        arr[...] = labels.astype(dtype, copy=False)
        arr.attrs.update({**attrs, "complete": False})
        arr.attrs["complete"] = True  # last: a folder without it is not a correction

    store.corrections.mkdir(parents=True, exist_ok=True)
    target = _correction_dir(store, case_id)
    if lock:
        with StoreLock(store.path, "segmote review: save correction"):
            _replace(store, case_id, target, write)
    else:
        _replace(store, case_id, target, write)
    log.info("saved the correction of %s (%d edited slice(s)) to %s", case_id, len(edited), target)
    return target


def _replace(store: OutputStore, case_id: str, target: Path, write: Any) -> None:
    import shutil

    atomic_write_dir(target, write)
    # what a save killed earlier left beside: its temporary folder, or the previous correction
    # moved aside (the new one is in place now, so neither is needed)
    for left in (*store.corrections.glob(f".{case_id}.*.tmp"),
                 *store.corrections.glob(f".{case_id}.*.old")):
        shutil.rmtree(left, ignore_errors=True)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return ""


def describe(entry: QueueEntry) -> str:
    """One line for a list: rank, case, QC and status."""
    qc = "-" if math.isnan(entry.qc) else f"{entry.qc:.2f}"
    return f"{entry.rank:>3}  {entry.case}  QC {qc}  {entry.status}"
