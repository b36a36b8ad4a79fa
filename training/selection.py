"""Reading the ``selection.json`` written by ``segmote curate`` (docs/curation.md).

The reader needs, per case, its split (patient-level, ``"train"``/``"test"``) and, for volumes,
the kept slice indices. It accepts the case entries as a mapping ``{case_id: {...}}`` or as a
list of ``{"case_id": ..., ...}``; slice lists as ``"slices"`` / ``"kept_slices"`` (ints or
``{"z": int}`` records). A selection without per-case splits may give
``"splits": {"train": [case ids], "test": [...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Selection", "load_selection"]


@dataclass(frozen=True)
class Selection:
    """Which cases and slices to use, and each case's split."""

    split_of: dict[str, str]
    slices_of: dict[str, tuple[int, ...] | None]
    source: str = ""

    def case_ids(self, split: str | None = None) -> list[str]:
        """Sorted case ids of ``split`` (all cases with ``None``)."""
        return sorted(c for c, s in self.split_of.items() if split is None or s == split)

    def slices(self, case_id: str) -> tuple[int, ...] | None:
        """Kept slice indices of a volume case, or ``None`` when the selection lists none."""
        return self.slices_of.get(case_id)


def _slice_list(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"{where}: slices must be a list, got {type(value).__name__}")
    out = []
    for item in value:
        z = item.get("z", item.get("slice")) if isinstance(item, dict) else item
        if isinstance(z, bool) or not isinstance(z, int):
            raise ValueError(f"{where}: slice entries must be integers, got {item!r}")
        out.append(z)
    return tuple(out)


def load_selection(path: str | Path) -> Selection:
    """Read ``selection.json``; errors name the file and the offending case."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selection file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    entries = data.get("cases", {})
    if isinstance(entries, list):
        items = []
        for e in entries:
            if not isinstance(e, dict) or "case_id" not in e:
                raise ValueError(f"{path}: case entries must be objects with 'case_id', got {e!r}")
            items.append((str(e["case_id"]), e))
    elif isinstance(entries, dict):
        items = [(str(k), v if isinstance(v, dict) else {"slices": v}) for k, v in entries.items()]
    else:
        raise ValueError(f"{path}: 'cases' must be a list or an object")
    split_of: dict[str, str] = {}
    for name, ids in (data.get("splits") or {}).items():
        for case_id in ids:
            split_of[str(case_id)] = str(name)
    slices_of: dict[str, tuple[int, ...] | None] = {}
    for case_id, e in items:
        where = f"{path}: case {case_id!r}"
        if "split" in e:
            split_of[case_id] = str(e["split"])
        elif case_id not in split_of:
            raise ValueError(f"{where}: no split given (neither 'split' nor 'splits')")
        slices_of[case_id] = _slice_list(e.get("slices", e.get("kept_slices")), where)
    for case_id in split_of:
        slices_of.setdefault(case_id, None)
    if not split_of:
        raise ValueError(f"{path}: the selection lists no cases")
    return Selection(split_of=split_of, slices_of=slices_of, source=str(path))
