"""The run report (parquet, CSV fallback) and the review queue for human correction."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segmote_core.fileio import atomic_write

__all__ = ["REPORT_COLUMNS", "case_row", "write_report", "read_report", "write_review_queue"]

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["case", "status", "error", "slices", "seconds", "mean_confidence",
                  "min_confidence", "expert_usage", "shape", "labels"]


def case_row(case: str, status: str, *, error: str = "", slices: int = 0, seconds: float = 0.0,
             confidence: Sequence[float | None] = (), expert: Sequence[int] = (),
             shape: Sequence[int] = (), labels: str = "") -> dict[str, Any]:
    """One report row. ``status``: ``done`` (this run), ``skipped`` (complete from an earlier
    run with the same signature) or ``failed``. ``expert_usage`` is JSON ``{expert: slices}``."""
    conf = np.asarray([c for c in confidence if c is not None and math.isfinite(c)], np.float64)
    used = [int(e) for e in expert if e is not None and int(e) >= 0]
    ids, counts = np.unique(np.asarray(used, np.int64), return_counts=True)
    return {"case": case, "status": status, "error": error, "slices": int(slices),
            "seconds": round(float(seconds), 3),
            "mean_confidence": float(conf.mean()) if conf.size else float("nan"),
            "min_confidence": float(conf.min()) if conf.size else float("nan"),
            "expert_usage": json.dumps({str(i): int(n) for i, n in zip(ids, counts)}),
            "shape": "x".join(str(int(s)) for s in shape), "labels": labels}


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


def write_review_queue(out: str | Path, rows: list[dict[str, Any]],
                       slice_confidence: dict[str, Sequence[float | None]],
                       worst: int = 5) -> Path:
    """Write ``OUT/review_queue.csv``: cases with labels, least confident first.

    Ordered by mean router confidence, then minimum slice confidence, then case id; cases
    without any confidence (no experts, or no box on any slice) come last. Each row lists the
    ``worst`` least confident slices to start the correction from.
    """
    import pandas as pd

    out = Path(out)
    keep = [r for r in rows if r["status"] in ("done", "skipped")]
    entries = []
    for r in keep:
        conf = slice_confidence.get(r["case"], ())
        scored = [(float(c), z) for z, c in enumerate(conf) if c is not None and math.isfinite(c)]
        scored.sort()
        entries.append({"case": r["case"], "mean_confidence": r["mean_confidence"],
                        "min_confidence": r["min_confidence"], "slices": r["slices"],
                        "least_confident_slices": " ".join(str(z) for _, z in scored[:worst]),
                        "labels": r["labels"]})
    df = pd.DataFrame(entries, columns=["case", "mean_confidence", "min_confidence", "slices",
                                        "least_confident_slices", "labels"])
    df = df.sort_values(["mean_confidence", "min_confidence", "case"], na_position="last")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    target = out / "review_queue.csv"
    atomic_write(target, lambda tmp: df.to_csv(tmp, index=False))
    return target


def read_report(out: str | Path):
    """The report of a run as a pandas DataFrame (parquet, or the CSV fallback)."""
    import pandas as pd

    out = Path(out)
    if (out / "report.parquet").exists():
        return pd.read_parquet(out / "report.parquet")
    return pd.read_csv(out / "report.csv", keep_default_na=False,
                       na_values={"mean_confidence": [""], "min_confidence": [""]})
