"""``segmote batch --categories``: the driver's side of multi-category label maps.

The categories are checked against the model's vocabulary on the driver, from the checkpoint's
JSON description (no model load, before Ray starts). Per case the driver collects each
category's per-slice confidence, expert and QC signals as batches come back, and signs the case
with the label table and a per-category summary (docs/pipeline.md, "Several categories").
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from segmote_core.categories import label_table, model_vocabulary, resolve_categories
from segmote_core.qc import as_json_list, case_qc, empty_signals, qc_attrs

__all__ = ["model_categories", "check_categories", "CategoryBook", "category_summary"]


def model_categories(spec: Any) -> tuple[tuple[str, ...], str]:
    """The vocabulary of the model ``spec`` (a :class:`pipeline.worker.ModelSpec`) names, read
    from its checkpoint's description, and how to name that model in a message."""
    from segmote_core.checkpoint import read_checkpoint_info

    if spec.segmote_checkpoint:
        path = spec.segmote_checkpoint
    elif spec.sam_checkpoint or spec.model_type == "lite_medsam":
        return (), f"bare {spec.model_type} (no SegMoTE weights)"
    else:
        from segmote_core.build import demo_model_path

        path = demo_model_path()
    return model_vocabulary(read_checkpoint_info(path).get("config", {})), f"the model {path}"


def check_categories(names: Sequence[str], spec: Any, mode: str) -> tuple[str, ...]:
    """``--categories`` resolved against the model's vocabulary (``all`` expanded).

    Raises:
        ValueError: not in auto mode, a model without vocabulary, or an unknown name (the
            message lists the known ones).
    """
    if mode != "auto":
        raise ValueError("--categories segments prompt-free (PPT, one pass per category): it "
                         "needs --mode auto")
    vocabulary, where = model_categories(spec)
    return resolve_categories(names, vocabulary, where)


class CategoryBook:
    """Per-slice results of each category of one case, filled as batches come back."""

    def __init__(self, n_slices: int, categories: Sequence[str]) -> None:
        self.categories = tuple(categories)
        self.table = label_table(self.categories)
        self.conf = {c: np.full(n_slices, np.nan, np.float32) for c in self.categories}
        self.expert = {c: np.full(n_slices, -1, np.int16) for c in self.categories}
        self.signals = {c: empty_signals(n_slices) for c in self.categories}

    def fill(self, start: int, per: dict[str, dict[str, np.ndarray]]) -> None:
        for c, values in per.items():
            n = len(values["confidence"])
            self.conf[c][start:start + n] = values["confidence"]
            self.expert[c][start:start + n] = values["expert"]
            for name in self.signals[c]:
                self.signals[c][name][start:start + n] = values[name]

    def attrs(self, get_slice: Callable[[int], np.ndarray] | None) -> dict[str, Any]:
        """What the case's attrs keep: ``label_table``, ``categories`` (per category its value,
        per-slice router confidence, expert and QC, ``qc_case``, ``qc_components``) and the
        case-level ``qc``: per slice the lowest QC of the categories on it (the worst structure
        says where to look), ``qc_case`` of that."""
        per: dict[str, Any] = {}
        worst: list[float | None] = []
        for value, c in self.table.items():
            v = int(value)
            reader = None if get_slice is None else (lambda z, v=v: get_slice(z) == v)
            q = qc_attrs(self.signals[c], reader)
            per[c] = {"value": v, "confidence": as_json_list(self.conf[c], 6),
                      "expert": [int(e) for e in self.expert[c]], "qc": q["qc"],
                      "qc_case": q["qc_case"], "qc_components": q["qc_components"]}
        n = len(next(iter(self.conf.values()))) if self.conf else 0
        for z in range(n):
            vals = [per[c]["qc"][z] for c in self.categories if per[c]["qc"][z] is not None]
            worst.append(min(vals) if vals else None)
        value = case_qc(worst)
        return {"label_table": dict(self.table), "categories": per, "qc": worst,
                "qc_case": None if not math.isfinite(value) else round(value, 4)}


def category_summary(categories: dict[str, Any] | None) -> dict[str, Any]:
    """The report's per-category figures from a case's ``categories`` attr: label value, case
    QC, lowest slice QC, slices where the category is empty, mean router confidence."""
    out: dict[str, Any] = {}
    for c, a in (categories or {}).items():
        qc = [v for v in a.get("qc", []) if v is not None]
        conf = [v for v in a.get("confidence", []) if v is not None]
        out[c] = {"value": a.get("value"),
                  "qc": a.get("qc_case"), "min_qc": min(qc) if qc else None,
                  "empty_slices": sum(v is None for v in a.get("qc", [])),
                  "mean_router_confidence": round(float(np.mean(conf)), 4) if conf else None}
    return out
