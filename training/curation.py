"""Curation of a labelled cohort (the paper's MedSeg-HQ quality assessment): ``segmote curate``.

1. Every slice is measured (:mod:`training.curation_metrics`).
2. Hard checks flag unusable slices: ``blank``, ``noise``, ``no foreground``,
   ``tiny foreground``, ``fragmented`` (thresholds in :class:`CurationConfig`).
3. A combined score ranks the slices of each dataset: each measure is normalised robustly per
   dataset, ``z = clip((x - median) / (1.4826 * MAD), -4, 4)``, and
   ``score = sum(weight * z) - flag_penalty * number_of_flags`` (weights in
   :data:`SCORE_WEIGHTS`; clarity and foreground ratio enter as logarithms).
4. The best ``keep`` fraction of each dataset's slices is kept; flagged slices never are.
5. Patients (attr ``patient``, else the case id) are split train/test ~9:1 per dataset with a
   seeded shuffle; a patient is on one side only, across all datasets.
6. ``selection.json`` (read by :func:`training.selection.load_selection`), a per-slice CSV report
   with the reason for each decision, and a JSON summary are written. The cohort is only read.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segmote_core.fileio import atomic_write, atomic_write_text
from segmote_core.io import open_cohort
from segmote_core.progress import CancelToken, ProgressCallback, report

from .curation_metrics import case_intensity_range, score_slice

__all__ = ["SCORE_WEIGHTS", "CurationConfig", "CurationResult", "score_cohort", "rank_slices",
           "split_patients", "curate", "output_paths"]

log = logging.getLogger(__name__)

SCORE_WEIGHTS: dict[str, float] = {"clarity": 1.0, "label_contrast": 1.0, "contrast": 0.5,
                                   "entropy": 0.5, "fg_ratio": 0.5, "noise": -1.0,
                                   "regions": -0.5}
_LOG_MEASURES = {"clarity", "fg_ratio", "regions"}
REPORT_COLUMNS = ["case_id", "dataset", "patient", "z", "split", "clarity", "contrast",
                  "label_contrast", "entropy", "noise", "fg_ratio", "fg_pixels", "regions",
                  "score", "rank", "kept", "reason"]


@dataclass(frozen=True)
class CurationConfig:
    """Thresholds of the hard checks and the selection parameters.

    Attributes:
        keep: fraction of each dataset's slices to keep (0 < keep <= 1).
        test_fraction: fraction of each dataset's patients held out (0.1 = a 9:1 split).
        seed: seed of the patient shuffle.
        blank_contrast: a slice whose normalised std is below this is ``blank``.
        blank_entropy: ... or whose entropy (bits) is below this.
        max_noise: noise sigma / slice std above this is ``noise`` (pure white noise ~ 1).
        min_label_contrast: with ``max_noise / 2`` exceeded, a label contrast under this is
            also ``noise`` (the image does not show the labelled structure).
        min_fg_pixels, min_fg_ratio: fewer foreground pixels than both is ``tiny foreground``.
        max_regions: more foreground components is ``fragmented``.
        flag_penalty: subtracted from the score per flag.
    """

    keep: float = 0.8
    test_fraction: float = 0.1
    seed: int = 0
    blank_contrast: float = 0.01
    blank_entropy: float = 0.5
    max_noise: float = 0.5
    min_label_contrast: float = 0.2
    min_fg_pixels: int = 32
    min_fg_ratio: float = 0.002
    max_regions: int = 40
    flag_penalty: float = 10.0
    weights: dict[str, float] = field(default_factory=lambda: dict(SCORE_WEIGHTS))

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        unknown = set(self.weights) - set(SCORE_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown score weights {sorted(unknown)}; known: {list(SCORE_WEIGHTS)}")


@dataclass
class CurationResult:
    """Rows (one dict per slice, :data:`REPORT_COLUMNS`), the selection dict, the summary dict
    and the written paths."""

    rows: list[dict[str, Any]]
    selection: dict[str, Any]
    summary: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def _flags(s: dict[str, Any], area: int, cfg: CurationConfig) -> list[str]:
    flags = []
    if s["contrast"] < cfg.blank_contrast or s["entropy"] < cfg.blank_entropy:
        flags.append("blank")
    elif s["noise"] > cfg.max_noise or (s["noise"] > cfg.max_noise / 2 and s["fg_pixels"]
                                        and s["label_contrast"] < cfg.min_label_contrast):
        flags.append("noise")
    if s["fg_pixels"] == 0:
        flags.append("no foreground")
    elif s["fg_pixels"] < max(cfg.min_fg_pixels, cfg.min_fg_ratio * area):
        flags.append("tiny foreground")
    if s["regions"] > cfg.max_regions:
        flags.append("fragmented")
    return flags


def score_cohort(cohort: str | Path, cfg: CurationConfig | None = None,
                 progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> list[dict[str, Any]]:
    """Measure and flag every slice of every labelled case (read slice by slice).

    Returns:
        One dict per slice: case_id, dataset, patient, z, the measures, ``flags`` (list).
    Raises:
        CohortError / FileNotFoundError: not a cohort; ValueError: a case without labels or
        with labels of another shape (naming the case).
    """
    cfg = cfg or CurationConfig()
    coh = open_cohort(cohort)
    ids = coh.case_ids()
    if not ids:
        raise ValueError(f"{cohort}: the cohort has no (complete) cases")
    rows: list[dict[str, Any]] = []
    for i, cid in enumerate(ids):
        case = coh.case(cid)
        where = f"{cohort}: case {cid!r}"
        if case.labels is None:
            raise ValueError(f"{where}: no 'labels' array (curation needs ground truth)")
        volume = case.axes == "ZYX"
        spatial = tuple(case.image.shape if volume else case.image.shape[:2])
        if tuple(case.labels.shape) != spatial:
            raise ValueError(f"{where}: labels shape {tuple(case.labels.shape)} differs from "
                             f"the image's spatial shape {spatial}")
        n = spatial[0] if volume else 1
        sample = np.unique(np.linspace(0, n - 1, min(n, 16)).round().astype(int))
        read = (lambda z: np.asarray(case.image[z])) if volume else (lambda z: np.asarray(case.image))
        value_range = case_intensity_range([read(int(z)) for z in sample])
        dataset = str(case.attrs.get("dataset") or "default")
        patient = str(case.attrs.get("patient") or cid)
        for z in range(n):
            labels = np.asarray(case.labels[z]) if volume else np.asarray(case.labels)
            s = score_slice(read(z), labels, value_range).as_dict()
            s["flags"] = _flags(s, labels.size, cfg)
            rows.append({"case_id": cid, "dataset": dataset, "patient": patient, "z": z, **s})
        report(progress, i + 1, len(ids), cancel)
    return rows


def _robust_z(values: np.ndarray) -> np.ndarray:
    med = float(np.median(values))
    scale = 1.4826 * float(np.median(np.abs(values - med)))
    if scale < 1e-12:
        scale = float(values.std())
    if scale < 1e-12:
        return np.zeros_like(values)
    return np.clip((values - med) / scale, -4.0, 4.0)


def rank_slices(rows: list[dict[str, Any]], cfg: CurationConfig | None = None) -> None:
    """Add ``score``, ``rank`` (1 = best, per dataset), ``kept`` and ``reason`` to the rows."""
    cfg = cfg or CurationConfig()
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_dataset.setdefault(r["dataset"], []).append(r)
    for dataset, group in by_dataset.items():
        score = np.zeros(len(group))
        for name, weight in cfg.weights.items():
            x = np.array([float(r[name]) for r in group])
            if name in _LOG_MEASURES:
                x = np.log10(x + (1.0 if name == "regions" else 1e-8))
            score += weight * _robust_z(x)
        score -= cfg.flag_penalty * np.array([len(r["flags"]) for r in group])
        order = np.argsort(-score, kind="stable")
        n_keep = math.ceil(cfg.keep * len(group))
        for rank, j in enumerate(order, 1):
            r = group[j]
            r["score"], r["rank"] = float(score[j]), rank
            r["kept"] = not r["flags"] and rank <= n_keep
            r["reason"] = ("kept" if r["kept"] else "; ".join(r["flags"]) if r["flags"]
                           else f"below cutoff (rank {rank} of {len(group)}, keep {cfg.keep:g})")
        log.info("%s: kept %d of %d slices", dataset, sum(r["kept"] for r in group), len(group))


def split_patients(rows: list[dict[str, Any]], test_fraction: float = 0.1,
                   seed: int = 0) -> dict[str, str]:
    """Patient -> ``"train"``/``"test"``: per dataset (in sorted order) a seeded shuffle of its
    not yet assigned patients puts ``round(test_fraction * n)`` of them (at least one when the
    dataset has two or more patients) in test. A patient seen in an earlier dataset keeps its
    side, so no patient is ever on both."""
    patients: dict[str, list[str]] = {}
    for r in rows:
        lst = patients.setdefault(r["dataset"], [])
        if r["patient"] not in lst:
            lst.append(r["patient"])
    side: dict[str, str] = {}
    for dataset in sorted(patients):
        pats = sorted(patients[dataset])
        n_test = round(test_fraction * len(pats))
        if test_fraction > 0 and len(pats) >= 2:
            n_test = max(1, n_test)
        n_test = min(n_test, len(pats) - 1) if len(pats) > 1 else 0
        n_test -= sum(side.get(p) == "test" for p in pats)
        free = [p for p in pats if p not in side]
        rng = np.random.default_rng([int(seed), zlib.crc32(dataset.encode())])
        free = [free[i] for i in rng.permutation(len(free))]
        for k, p in enumerate(free):
            side[p] = "test" if k < n_test else "train"
    return side


def output_paths(out: str | Path) -> dict[str, Path]:
    """``out`` ending in ``.json``: that file is the selection, the report files sit beside it
    (``<stem>_report.csv``, ``<stem>_summary.json``); otherwise ``out`` is a directory holding
    ``selection.json``, ``curation_report.csv``, ``curation_summary.json``."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        return {"selection": out, "report": out.with_name(out.stem + "_report.csv"),
                "summary": out.with_name(out.stem + "_summary.json")}
    return {"selection": out / "selection.json", "report": out / "curation_report.csv",
            "summary": out / "curation_summary.json"}


def _selection_and_summary(rows: list[dict[str, Any]], cohort: Path,
                           cfg: CurationConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    kept_rows = [r for r in rows if r["kept"]]
    side = split_patients(kept_rows, cfg.test_fraction, cfg.seed)
    cases: dict[str, dict[str, Any]] = {}
    for r in rows:
        r["split"] = side.get(r["patient"], "")
        if r["kept"]:
            entry = cases.setdefault(r["case_id"], {"split": side[r["patient"]],
                                                    "dataset": r["dataset"],
                                                    "patient": r["patient"], "slices": []})
            entry["slices"].append(int(r["z"]))
    splits = {"train": sorted(c for c, e in cases.items() if e["split"] == "train"),
              "test": sorted(c for c, e in cases.items() if e["split"] == "test")}
    params = {k: v for k, v in asdict(cfg).items()}
    selection = {"kind": "segmote-selection", "version": 1, "cohort": str(cohort.resolve()),
                 "config": params, "splits": splits, "cases": dict(sorted(cases.items()))}
    datasets: dict[str, Any] = {}
    for r in rows:
        d = datasets.setdefault(r["dataset"], {"scored": 0, "kept": 0, "reasons": {},
                                               "slices": {"train": 0, "test": 0},
                                               "patients": {"train": set(), "test": set()},
                                               "cases": {"train": set(), "test": set()}})
        d["scored"] += 1
        key = "below cutoff" if r["reason"].startswith("below cutoff") else r["reason"]
        d["reasons"][key] = d["reasons"].get(key, 0) + 1
        if r["kept"]:
            d["kept"] += 1
            d["slices"][r["split"]] += 1
            d["patients"][r["split"]].add(r["patient"])
            d["cases"][r["split"]].add(r["case_id"])
    for d in datasets.values():
        for key in ("patients", "cases"):
            d[key] = {s: len(v) for s, v in d[key].items()}
    summary = {"cohort": str(cohort), "config": params, "scored_slices": len(rows),
               "kept_slices": len(kept_rows), "cases_train": len(splits["train"]),
               "cases_test": len(splits["test"]),
               "patients_train": sum(v == "train" for v in side.values()),
               "patients_test": sum(v == "test" for v in side.values()),
               "score": "sum(weight * robust_z(measure)) - flag_penalty * flags, per dataset",
               "weights": dict(cfg.weights), "datasets": datasets}
    return selection, summary


def curate(cohort: str | Path, out: str | Path, *, keep: float = 0.8, test_fraction: float = 0.1,
           seed: int = 0, config: CurationConfig | None = None,
           progress: ProgressCallback | None = None,
           cancel: CancelToken | None = None) -> CurationResult:
    """Score, select and split a labelled cohort; write selection, report CSV and summary JSON.

    Args:
        cohort: labelled cohort, docs/formats.md (never written).
        out: a directory or a ``.json`` selection path (:func:`output_paths`).
        keep, test_fraction, seed: see :class:`CurationConfig` (ignored when ``config`` given).
    Raises:
        ValueError: bad parameters, an output inside the cohort, a case without labels.
    """
    cfg = config or CurationConfig(keep=keep, test_fraction=test_fraction, seed=seed)
    cohort = Path(cohort)
    paths = output_paths(out)
    if cohort.resolve() in paths["selection"].resolve().parents:
        raise ValueError(f"{out}: the curation output must not be inside the cohort {cohort}")
    rows = score_cohort(cohort, cfg, progress, cancel)
    rank_slices(rows, cfg)
    selection, summary = _selection_and_summary(rows, cohort, cfg)
    paths["selection"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["selection"], json.dumps(selection, indent=1))
    atomic_write_text(paths["summary"], json.dumps(summary, indent=1))
    atomic_write(paths["report"], lambda tmp: _write_report_csv(tmp, rows))
    log.info("curation of %s: kept %d of %d slices -> %s", cohort, summary["kept_slices"],
             summary["scored_slices"], paths["selection"])
    return CurationResult(rows, selection, summary, paths)


def _write_report_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["dataset"], r["rank"])):
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
