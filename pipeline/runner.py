"""``segmote batch``'s driver: check cases, start Ray, resume, stream slices, sign, report.

```python
from pipeline import BatchOptions, run_batch
summary = run_batch(BatchOptions("cohort.zarr", "labels.zarr"))
summary.ok, summary.failed, summary.slices_per_second
```
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from segmote_core import __version__
from segmote_core.io import CohortError, open_cohort
from segmote_core.qc import empty_signals, qc_attrs
from segmote_core.locking import StoreLock

from .cases import CaseError, CaseInput, batch_count, iter_tasks, open_case
from .engine import ActorPool, PoolConfig, ray_session, resolve_pool
from .labelmap import CategoryBook, category_summary, check_categories
from .report import case_row, write_report, write_review_queue, write_slice_queue
from .store import OutputStore, OutputStoreMismatchError
from .worker import ModelSpec, SliceBatchResult, SliceTask, check_auto_trained, peak_rss_mb

__all__ = ["BatchOptions", "BatchSummary", "run_batch", "OutputStoreMismatchError"]

log = logging.getLogger(__name__)

CHANGED_NOTE = "input changed since the earlier labels: segmented again"


@dataclass(frozen=True)
class BatchOptions:
    """Everything one run depends on (built by the CLI, or by hand).

    Attributes:
        mode: ``"auto"`` (PPT, prompt-free) or ``"box"`` (one box per slice around
            ``label_key > 0``, or ``== label_id``, of the input case: re-segmentation).
        label_value: id written for the mask (default ``label_id`` in box mode, else 1).
        batch_size: slices per actor call (never across cases).
        address: Ray cluster to join; ``None`` starts a private local Ray (``num_cpus``).
        cases: case ids to run (default all complete cases of the cohort).
        progress: tqdm bars (``None``: only on a terminal).
        categories: names of the model's vocabulary (``("all",)``: all of it): one PPT pass
            per category per slice, resolved into one label map whose values follow the label
            table ``{"1": categories[0], ...}`` (``segmote_core.categories``); empty: one
            binary mask per slice as before.
    """

    cohort: str
    out: str
    model: ModelSpec = field(default_factory=ModelSpec)
    mode: str = "auto"
    label_key: str = "labels"
    label_id: int | None = None
    label_value: int | None = None
    batch_size: int = 8
    pool: PoolConfig = field(default_factory=PoolConfig)
    address: str | None = None
    num_cpus: int | None = None
    cases: tuple[str, ...] = ()
    overwrite: bool = False
    skip_reviewed: bool = False
    progress: bool | None = None
    categories: tuple[str, ...] = ()

    def check(self) -> None:
        if self.mode not in ("auto", "box"):
            raise ValueError(f"--mode must be 'auto' or 'box', got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        value = self.resolved_label_value
        if not 1 <= value <= 65535:
            raise ValueError(f"label value must be in 1..65535, got {value}")

    @property
    def resolved_label_value(self) -> int:
        if self.label_value is not None:
            return int(self.label_value)
        return int(self.label_id) if self.mode == "box" and self.label_id else 1


@dataclass
class BatchSummary:
    """What a run did. ``rows`` are the report's rows (one per selected case)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    startup_seconds: float = 0.0
    run_seconds: float = 0.0
    slices: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    driver_peak_rss_mb: float = 0.0
    report: str = ""
    review_queue: str = ""
    review_slices: str = ""
    report_error: str = ""

    @property
    def input_changed(self) -> list[str]:
        """Cases segmented again because their input case was rewritten since."""
        return [r["case"] for r in self.rows if r.get("note") == CHANGED_NOTE]

    @property
    def failed(self) -> list[str]:
        return [r["case"] for r in self.rows if r["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.report_error

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0

    @property
    def slices_per_second_after_startup(self) -> float:
        """Slices per second from the first batch sent to the last result written."""
        return self.slices / self.run_seconds if self.run_seconds > 0 else 0.0


class CaseInFlight:
    """Book-keeping for one case in flight."""

    def __init__(self, case: CaseInput, t0: float, categories: tuple[str, ...] = ()) -> None:
        self.case = case
        self.sent = 0
        self.received = 0
        self.reading = True
        self.error: str | None = None
        self.conf = np.full(case.n_slices, np.nan, np.float32)
        self.expert = np.full(case.n_slices, -1, np.int16)
        self.qc = empty_signals(case.n_slices)
        self.book = CategoryBook(case.n_slices, categories) if categories else None
        self.compute = 0.0
        self.t0 = t0


class _Driver:
    """Feeds the pool case by case and writes what comes back."""

    def __init__(self, opts: BatchOptions, store: OutputStore, todo: list[CaseInput],
                 summary: BatchSummary, bars: tuple[Any, Any]):
        self.opts, self.store, self.todo, self.summary = opts, store, todo, summary
        self.case_bar, self.slice_bar = bars
        self.open: dict[str, CaseInFlight] = {}
        self.changed: set[str] = set()   # cases whose input was rewritten since their labels

    def tasks(self) -> Iterator[SliceTask]:
        value = self.opts.resolved_label_value
        for case in self.todo:
            cats = self.opts.categories
            state = CaseInFlight(case, time.perf_counter(), cats)
            self.open[case.case_id] = state
            try:
                top = len(cats) if cats else value
                self.store.begin(case.case_id, case.shape, "uint8" if top <= 255 else "uint16")
                for task in iter_tasks(case, self.opts.batch_size, value, self.opts.label_id):
                    if state.error:
                        break
                    task.categories = cats
                    state.sent += 1
                    yield task
            except Exception as exc:  # noqa: BLE001 - CaseError, store errors: this case only
                state.error = state.error or str(exc)
            state.reading = False
            self._maybe_close(case.case_id)

    def accept(self, res: SliceBatchResult) -> None:
        state = self.open.get(res.case_id)
        if state is None:
            return
        state.received += 1
        state.compute += res.seconds
        if res.error:
            state.error = state.error or f"{state.case.where}: {res.error}"
        elif not state.error:
            try:
                n = len(res.labels)
                self.store.write(res.case_id, res.start, res.labels)
                state.conf[res.start:res.start + n] = res.confidence
                state.expert[res.start:res.start + n] = res.expert
                for name, values in (res.qc or {}).items():
                    state.qc[name][res.start:res.start + n] = values
                if state.book is not None:
                    state.book.fill(res.start, res.categories or {})
                self.slice_bar.update(n)
                self.summary.slices += n
            except Exception as exc:  # noqa: BLE001 - e.g. disk full: fail this case
                state.error = f"{state.case.where}: cannot write labels: {exc}"
        self._maybe_close(res.case_id)

    def _maybe_close(self, case_id: str) -> None:
        state = self.open[case_id]
        if state.reading or state.received < state.sent:
            return
        del self.open[case_id]
        case = state.case
        labels = f"{self.store.path}/{case_id}/labels"
        wall = time.perf_counter() - state.t0
        if not state.error:
            try:
                arr = self.store.root[case_id]["labels"]
                reader = (lambda z: arr[z]) if arr.ndim == 3 else None
                qc = (state.book.attrs(reader) if state.book is not None
                      else qc_attrs(state.qc, reader))
                self.store.finish(case_id, state.conf, state.expert, {
                    "slices": case.n_slices, "seconds": round(wall, 3),
                    "compute_seconds": round(state.compute, 3), "mode": self.opts.mode,
                    "modality": case.modality, "segmote_version": __version__,
                    "input_signature": case.input_signature, **qc})
            except Exception as exc:  # noqa: BLE001 - disk full, read-only: this case only
                state.error = (f"{case.where}: cannot write labels to {labels}: "
                               f"{type(exc).__name__}: {exc}")
        if state.error:
            try:
                self.store.discard(case_id)
            except Exception as exc:  # noqa: BLE001 - the rerun redoes it (complete is unset)
                log.error("%s: cannot remove the partial labels (%s); a rerun redoes them",
                          labels, exc)
            log.error("case %s failed: %s", case_id, state.error)
            self.summary.rows.append(case_row(case_id, "failed", error=state.error,
                                              shape=case.shape, seconds=wall))
        else:
            conf = [None if not np.isfinite(c) else float(c) for c in state.conf]
            self.summary.rows.append(case_row(
                case_id, "done", slices=case.n_slices, seconds=wall, confidence=conf,
                expert=state.expert.tolist(), shape=case.shape, labels=labels, qc=qc["qc"],
                categories=category_summary(qc.get("categories"))))
            if case_id in self.changed:
                self.summary.rows[-1]["note"] = CHANGED_NOTE
        self.case_bar.update(1)


def _signature(worker_sig: dict[str, Any], opts: BatchOptions) -> dict[str, Any]:
    box = opts.mode == "box"
    sig = {"model": worker_sig, "mode": opts.mode,
           "label_key": opts.label_key if box else None,
           "label_id": opts.label_id if box else None,
           "label_value": opts.resolved_label_value}
    if opts.categories:  # other categories (or another order) are another output
        sig["categories"] = list(opts.categories)
        sig["label_table"] = CategoryBook(0, opts.categories).table
    return sig


def _select(opts: BatchOptions) -> tuple[Any, list[str]]:
    try:
        cohort = open_cohort(opts.cohort)
    except CohortError as exc:
        raise ValueError(str(exc)) from exc
    ids = cohort.case_ids()
    if opts.cases:
        unknown = sorted(set(opts.cases) - set(ids))
        if unknown:
            raise ValueError(f"{opts.cohort}: no complete case(s) named {', '.join(unknown)}")
        ids = [c for c in ids if c in set(opts.cases)]
    return cohort, ids


def run_batch(opts: BatchOptions) -> BatchSummary:
    """Segment (or resume) every selected case of ``opts.cohort`` into ``opts.out``.

    Raises:
        ValueError: bad options, not a cohort, unknown cases, output inside the input.
        FileNotFoundError: a model file is missing.
        OutputStoreMismatchError: ``opts.out`` holds another model's labels and ``overwrite``
            is off.
        StoreLockedError: another process writes ``opts.out`` (the message names it).
    """
    opts.check()
    opts.model.check_files()
    if opts.mode == "auto":
        check_auto_trained(opts.model)
    if opts.categories:  # before the lock and Ray: an unknown name costs nothing
        opts = replace(opts, categories=check_categories(opts.categories, opts.model, opts.mode))
    t_start = time.perf_counter()
    cohort, ids = _select(opts)
    inputs = opts.model.files()
    OutputStore.precheck(opts.out, opts.cohort, inputs)
    with StoreLock(opts.out, "segmote batch") as lock:
        OutputStore.probe(opts.out)  # before Ray and the model start: a read-only OUT exits 2
        return _run_locked(opts, cohort, ids, inputs, lock, t_start)


def _kept_row(store: OutputStore, case: Any) -> dict[str, Any]:
    """The report row of a case whose stored labels stay as they are (complete or reviewed)."""
    attrs = store.case_attrs(case.case_id)
    return case_row(case.case_id, "skipped", slices=attrs.get("slices", 0),
                    seconds=attrs.get("seconds", 0.0), confidence=attrs.get("confidence", []),
                    expert=attrs.get("expert", []), shape=case.shape, qc=attrs.get("qc", []),
                    labels=f"{store.path}/{case.case_id}/labels",
                    categories=category_summary(attrs.get("categories")))


def _run_locked(opts: BatchOptions, cohort: Any, ids: list[str], inputs: list[str],
                lock: StoreLock, t_start: float) -> BatchSummary:
    from tqdm import tqdm

    summary = BatchSummary()
    cases: list[CaseInput] = []
    bad: dict[str, str] = {}
    for case_id in ids:
        try:
            cases.append(open_case(cohort, case_id, opts.mode, opts.label_key))
        except CaseError as exc:
            bad[case_id] = str(exc)
    n_batches = sum(batch_count(c.n_slices, opts.batch_size) for c in cases)
    with ray_session(opts.address, opts.num_cpus) as resources:
        pool_cfg = resolve_pool(opts.pool, resources, max(1, n_batches))
        pool = ActorPool(opts.model, pool_cfg)
        signature = _signature(pool.signature(), opts)
        summary.startup_seconds = time.perf_counter() - t_start
        log.info("%d actor(s) ready (%s CPU, %s GPU each) in %.1f s: %s",
                 pool_cfg.num_actors, pool_cfg.cpus_per_actor, pool_cfg.gpus_per_actor,
                 summary.startup_seconds, opts.model.describe())
        store = OutputStore(opts.out, opts.cohort, signature, opts.overwrite, inputs, lock=lock,
                            skip_reviewed=opts.skip_reviewed)
        todo, changed = [], set()
        for case in cases:
            if opts.skip_reviewed and store.is_reviewed(case.case_id):
                # reviewed: its pre-label and correction are never touched; it stays queued
                summary.rows.append(_kept_row(store, case))
                summary.rows[-1]["note"] = "reviewed: kept"
                continue
            if store.input_changed(case.case_id, case.input_signature):
                changed.add(case.case_id)
                log.warning("case %s: the input case changed since its labels were made: "
                            "segmenting it again", case.case_id)
            if store.is_complete(case.case_id, case.input_signature):
                summary.rows.append(_kept_row(store, case))
            else:
                todo.append(case)
        for case_id, error in bad.items():
            log.error("case %s failed: %s", case_id, error)
            summary.rows.append(case_row(case_id, "failed", error=error))
        log.info("%d case(s): %d to segment, %d already complete, %d unreadable", len(ids),
                 len(todo), len(ids) - len(todo) - len(bad), len(bad))
        disable = None if opts.progress is None else not opts.progress
        with tqdm(total=len(ids), desc="cases", unit="case", position=0, disable=disable,
                  initial=len(ids) - len(todo)) as case_bar, \
                tqdm(total=sum(c.n_slices for c in todo), desc="slices", unit="slice",
                     position=1, disable=disable) as slice_bar:
            driver = _Driver(opts, store, todo, summary, (case_bar, slice_bar))
            driver.changed = changed
            t_run = time.perf_counter()
            for result in pool.run(driver.tasks()):
                driver.accept(result)
            summary.run_seconds = time.perf_counter() - t_run
        for case_id, state in list(driver.open.items()):  # cannot happen unless Ray lost work
            try:
                store.discard(case_id)
            except OSError as exc:
                log.error("%s/%s: cannot remove partial labels: %s", store.path, case_id, exc)
            summary.rows.append(case_row(case_id, "failed", error=state.error or
                                         "incomplete: not all slices came back"))
        summary.workers = pool.info()
    summary.seconds = time.perf_counter() - t_start
    summary.driver_peak_rss_mb = peak_rss_mb()
    summary.rows.sort(key=lambda r: r["case"])
    write_outputs(Path(opts.out), summary)
    return summary


def write_outputs(out: Path, summary: BatchSummary) -> None:
    """Write the report and the review queue. If even that fails (disk full, read-only) the
    run is not lost: complete cases stay complete, the log says what happened and what to do,
    and ``summary.report`` stays empty (the CLI then exits 1)."""
    try:
        summary.report = str(write_report(out, summary.rows))
        summary.review_queue = str(write_review_queue(out, summary.rows))
        summary.review_slices = str(write_slice_queue(out, summary.rows))
    except OSError as exc:
        summary.report_error = (f"cannot write the report to {out}: {type(exc).__name__}: "
                                f"{exc}; complete cases are kept: free space (or fix the "
                                f"permissions) and rerun the same command to write it")
        log.error("%s", summary.report_error)
