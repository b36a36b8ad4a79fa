"""The run report (parquet, CSV fallback) and the review queue for human correction.

The queue is ordered by the QC score of :mod:`segmote_core.qc` (lowest predicted quality first);
the router confidence (the MoTE gate's probability of the chosen expert) stays in the report
under its own name, for what it is: which expert was used, not how good the mask is.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segmote_core.fileio import atomic_write

__all__ = ["REPORT_COLUMNS", "case_row", "write_report", "read_report", "write_review_queue",
           "write_slice_queue"]

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["case", "status", "error", "slices", "seconds", "qc", "min_qc",
                  "worst_slices", "empty_slices", "mean_router_confidence",
                  "min_router_confidence", "expert_usage", "shape", "labels", "note",
                  "categories"]
QUEUE_COLUMNS = ["rank", "case", "qc", "min_qc", "worst_slices", "empty_slices", "slices",
                 "mean_router_confidence", "labels"]


def case_row(case: str, status: str, *, error: str = "", slices: int = 0, seconds: float = 0.0,
             confidence: Sequence[float | None] = (), expert: Sequence[int] = (),
             shape: Sequence[int] = (), labels: str = "",
             qc: Sequence[float | None] = (),
             categories: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report row. ``status``: ``done`` (this run), ``skipped`` (complete from an earlier
    run with the same signature) or ``failed``. ``expert_usage`` is JSON ``{expert: slices}``.
    ``qc`` is the per-slice QC (``None``: nothing segmented); the row keeps the case's QC
    (:func:`segmote_core.qc.case_qc`), its lowest slice, its worst slices and the empty ones.
    ``categories`` (``segmote batch --categories``): per category its label value, QC, lowest
    slice QC, empty slices and mean router confidence, kept as JSON (empty without)."""
    from segmote_core.qc import as_json_list, case_qc, worst_slices

    rated = [float(v) for v in qc if v is not None and math.isfinite(v)]
    conf = np.asarray([c for c in confidence if c is not None and math.isfinite(c)], np.float64)
    used = [int(e) for e in expert if e is not None and int(e) >= 0]
    ids, counts = np.unique(np.asarray(used, np.int64), return_counts=True)
    return {"case": case, "status": status, "error": error, "slices": int(slices),
            "seconds": round(float(seconds), 3),
            "qc": case_qc(rated), "min_qc": min(rated) if rated else float("nan"),
            "worst_slices": " ".join(str(z) for z in worst_slices(list(qc))),
            "empty_slices": sum(v is None or not math.isfinite(v) for v in qc),
            "mean_router_confidence": float(conf.mean()) if conf.size else float("nan"),
            "min_router_confidence": float(conf.min()) if conf.size else float("nan"),
            "expert_usage": json.dumps({str(i): int(n) for i, n in zip(ids, counts)}),
            "shape": "x".join(str(int(s)) for s in shape), "labels": labels,
            "note": "",  # e.g. "input changed since the earlier labels: segmented again"
            "categories": json.dumps(categories) if categories else "",
            # per slice, for the slice queue (review_slices.csv); not a report column
            "slice_qc": as_json_list(qc)}


def write_report(out: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``OUT/report.parquet`` (``report.csv`` when no parquet engine is installed).

    Returns the path written. The write is atomic (temp file + rename).
    """
    import pandas as pd

    out = Path(out)
    df = pd.DataFrame(rows, columns=REPORT_COLUMNS).sort_values("case").reset_index(drop=True)
    target = out / "report.parquet"
    try:
        import pyarrow  # noqa: F401

        atomic_write(target, lambda tmp: df.to_parquet(tmp, index=False))
    except ImportError:
        log.warning("pyarrow is not installed: writing the report as CSV")
        target = out / "report.csv"
        atomic_write(target, lambda tmp: df.to_csv(tmp, index=False))
    return target


def write_review_queue(out: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``OUT/review_queue.csv``: cases with labels, lowest predicted quality first.

    Ordered by the case's QC, then its lowest slice QC, then case id. A case where nothing was
    segmented on any slice (QC null) comes first: an empty pre-label is the likeliest miss.
    Each row lists the case's worst slices (lowest QC first) to start the correction from and
    the number of slices left empty.
    """
    import pandas as pd

    out = Path(out)
    keep = [r for r in rows if r["status"] in ("done", "skipped")]
    df = pd.DataFrame([{c: r.get(c) for c in QUEUE_COLUMNS[1:]} for r in keep],
                      columns=QUEUE_COLUMNS[1:])
    df["_unrated"] = df["qc"].isna()
    df = df.sort_values(["_unrated", "qc", "min_qc", "case"], ascending=[False, True, True, True],
                        na_position="last").drop(columns="_unrated")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    target = out / "review_queue.csv"
    atomic_write(target, lambda tmp: df.to_csv(tmp, index=False))
    return target


def write_slice_queue(out: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``OUT/review_slices.csv``: single slices across the cohort, lowest QC first
    (:func:`segmote_core.qc.slice_review_order`), the order the Review panel's "Next worst
    slice" walks, over the cases the case queue lists. Columns: rank, case, slice, qc (empty: a
    likely miss, nothing segmented)."""
    import pandas as pd

    from segmote_core.qc import slice_review_order

    order = slice_review_order({r["case"]: r.get("slice_qc") or [] for r in rows
                                if r["status"] in ("done", "skipped")})
    df = pd.DataFrame([{"rank": i + 1, "case": c, "slice": z,
                        "qc": round(v, 4) if math.isfinite(v) else None}
                       for i, (c, z, v) in enumerate(order)],
                      columns=["rank", "case", "slice", "qc"])
    target = Path(out) / "review_slices.csv"
    atomic_write(target, lambda tmp: df.to_csv(tmp, index=False))
    return target


def read_report(out: str | Path):
    """The report of a run as a pandas DataFrame (parquet, or the CSV fallback)."""
    import pandas as pd

    out = Path(out)
    if (out / "report.parquet").exists():
        return pd.read_parquet(out / "report.parquet")
    return pd.read_csv(out / "report.csv", keep_default_na=False,
                       na_values={c: [""] for c in ("qc", "min_qc", "mean_router_confidence",
                                                    "min_router_confidence")})
