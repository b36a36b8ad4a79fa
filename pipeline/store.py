"""The run's output store (SPEC 2.1): ``OUT.zarr/<case>/labels``, signed, ``complete`` last.

```
OUT.zarr/                 attrs {"segmote": {"kind": "labels", "version": 1},
                                 "cohort": "/abs/cohort.zarr", "signature": {...},
                                 "signature_sha256": "..."}
  <case>/labels           uint8 (uint16 for ids > 255), the image's spatial shape, whole-slice
                          chunks; attrs: signature_sha256, signature, expert (per slice, -1 =
                          none), confidence (per slice, null = none), slices, seconds, mode,
                          "complete": true written last
  report.parquet / .csv   one row per case (pipeline.report)
  review_queue.csv        complete cases, least confident first
```
A case counts as done only when its ``complete`` flag is true and its signature matches; anything
else (absent, half written, unreadable attrs) is deleted and redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from segmote_core.errors import OutputStoreMismatchError

__all__ = ["OutputStore", "OutputStoreMismatchError", "signature_hash", "STORE_KIND"]

log = logging.getLogger(__name__)

STORE_KIND = {"kind": "labels", "version": 1}


def signature_hash(signature: dict[str, Any]) -> str:
    """sha256 of the signature's canonical JSON."""
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


class OutputStore:
    """Opens or creates ``OUT.zarr`` for one signature.

    Args:
        path: the output store (never the input cohort nor inside it).
        cohort: the input cohort path (checked, recorded).
        signature: model + configuration signature of this run.
        overwrite: replace outputs of another signature instead of refusing.
    Raises:
        OutputStoreMismatchError: the store holds another signature and ``overwrite`` is false.
        ValueError: ``path`` is the cohort, inside it, or an unrelated zarr/file.
    """

    def __init__(self, path: str | Path, cohort: str | Path, signature: dict[str, Any],
                 overwrite: bool = False) -> None:
        import zarr

        self.path = Path(path).resolve()
        cohort = Path(cohort).resolve()
        self.precheck(self.path, cohort)
        self.signature = signature
        self.sha = signature_hash(signature)
        if self.path.exists():
            try:
                self.root = zarr.open_group(str(self.path), mode="r+")
            except Exception as exc:  # noqa: BLE001 - zarr raises several types
                raise ValueError(f"{self.path} exists and is not a zarr group: {exc}") from exc
            attrs = dict(self.root.attrs)
            if (attrs.get("segmote") or {}).get("kind") != "labels":
                raise ValueError(f"{self.path} exists and is not a SegMoTE labels store "
                                 f"(attrs['segmote'] = {attrs.get('segmote')!r})")
            old = attrs.get("signature_sha256")
            stale = self._foreign_cases()
            if (old not in (None, self.sha) or stale) and not overwrite:
                raise OutputStoreMismatchError(
                    f"{self.path} holds labels of another model/configuration (store "
                    f"signature {str(old)[:12]}, this run {self.sha[:12]}; cases "
                    f"{', '.join(stale[:5]) or '-'}): pass --overwrite to replace them or "
                    f"choose another output")
            if old not in (None, self.sha) or stale:
                self._drop_foreign(stale if old == self.sha else None)
        else:
            self.root = zarr.open_group(str(self.path), mode="w-")
        self.root.attrs.update({"segmote": dict(STORE_KIND), "cohort": str(cohort),
                                "signature": signature, "signature_sha256": self.sha})

    @staticmethod
    def precheck(path: str | Path, cohort: str | Path) -> None:
        """Cheap checks before any work starts: not the input, not an unrelated store.

        Raises:
            ValueError: naming the path and the problem.
        """
        import json as _json

        path, cohort = Path(path).resolve(), Path(cohort).resolve()
        if path == cohort or cohort in path.parents:
            raise ValueError(f"output {path} is the input cohort or inside it; the input "
                             f"is never written to: choose another output path")
        if path.exists():
            meta = path / "zarr.json"
            try:
                kind = (_json.loads(meta.read_text()).get("attributes", {})
                        .get("segmote", {}).get("kind"))
            except (OSError, ValueError, AttributeError):
                kind = None
            if kind != "labels":
                raise ValueError(f"{path} exists and is not a SegMoTE labels store; choose "
                                 f"another output path")

    def _foreign_cases(self) -> list[str]:
        """Complete cases signed by another signature."""
        out = []
        for name, attrs in self._case_attrs():
            if attrs.get("complete") is True and attrs.get("signature_sha256") != self.sha:
                out.append(name)
        return sorted(out)

    def _groups(self) -> list[tuple[str, Any]]:
        """The case groups; the report files beside them are not zarr nodes (no warning)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            return list(self.root.groups())

    def _case_attrs(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for name, group in self._groups():
            try:
                out.append((name, dict(group["labels"].attrs) if "labels" in group else {}))
            except Exception:  # noqa: BLE001 - half-written metadata: treated as incomplete
                out.append((name, {}))
        return out

    def _drop_foreign(self, names: list[str] | None) -> None:
        names = names if names is not None else [n for n, _ in self._groups()]
        log.warning("--overwrite: deleting %d case(s) of another signature from %s",
                    len(names), self.path)
        for name in names:
            del self.root[name]

    def is_complete(self, case_id: str) -> bool:
        """True only for a case whose ``complete`` flag is set under this run's signature."""
        try:
            if case_id not in self.root:
                return False
            attrs = dict(self.root[case_id]["labels"].attrs)
        except Exception:  # noqa: BLE001 - unreadable metadata: not complete
            return False
        return attrs.get("complete") is True and attrs.get("signature_sha256") == self.sha

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self.root[case_id]["labels"].attrs)

    def begin(self, case_id: str, shape: tuple[int, ...], dtype: str = "uint8") -> Any:
        """(Re)create ``<case>/labels`` with ``complete: false``; stale contents are deleted."""
        if case_id in self.root:
            log.info("%s: redoing incomplete case %s", self.path, case_id)
            del self.root[case_id]
        chunks = (1, *shape[1:]) if len(shape) == 3 else tuple(shape)
        arr = self.root.create_group(case_id).create_array(
            "labels", shape=tuple(shape), dtype=dtype, chunks=chunks, fill_value=0)
        arr.attrs.update({"complete": False, "signature_sha256": self.sha})
        return arr

    def write(self, case_id: str, start: int, labels: np.ndarray) -> None:
        """Write ``labels`` ``(B, Y, X)`` at slices ``start..``; 2D cases take ``B == 1``."""
        arr = self.root[case_id]["labels"]
        if arr.ndim == 2:
            arr[...] = labels[0]
        else:
            arr[start:start + len(labels)] = labels

    def finish(self, case_id: str, confidence: np.ndarray, expert: np.ndarray,
               extra: dict[str, Any]) -> None:
        """Sign the case with per-slice results, then set ``complete: true`` (a separate, last
        metadata write)."""
        arr = self.root[case_id]["labels"]
        arr.attrs.update({
            **extra,
            "signature": self.signature, "signature_sha256": self.sha,
            "confidence": [None if not math.isfinite(float(c)) else round(float(c), 6)
                           for c in confidence],
            "expert": [int(e) for e in expert],
        })
        arr.attrs["complete"] = True

    def discard(self, case_id: str) -> None:
        """Remove a failed case's partial output (a rerun redoes it)."""
        if case_id in self.root:
            del self.root[case_id]
