"""The run's output store (docs/formats.md): ``OUT.zarr/<case>/labels``, signed, ``complete`` last.

```
OUT.zarr/                 attrs {"segmote": {"kind": "labels", "version": 1},
                                 "cohort": "/abs/cohort.zarr", "signature": {...},
                                 "signature_sha256": "..."}
  <case>/labels           uint8 (uint16 for ids > 255), the image's spatial shape, whole-slice
                          chunks; attrs: signature_sha256, signature, expert (per slice, -1 =
                          none), confidence (per slice, null = none), slices, seconds, mode,
                          "complete": true written last
  report.parquet / .csv   one row per case (pipeline.report)
  review_queue.csv        complete cases, lowest QC first
  review_slices.csv       single slices across the cases, lowest QC first
```
A case counts as done only when its ``complete`` flag is true and its signature matches; anything
else (absent, half written, unreadable attrs) is deleted and redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segmote_core.errors import OutputStoreMismatchError
from segmote_core.locking import StoreLock, lock_path

__all__ = ["OutputStore", "OutputStoreMismatchError", "ForeignNodeError",
           "OutputNotWritableError", "signature_hash", "STORE_KIND"]

log = logging.getLogger(__name__)

STORE_KIND = {"kind": "labels", "version": 1}


class OutputNotWritableError(ValueError):
    """The output cannot be written (read-only, full, no permission): found before starting."""


class ForeignNodeError(RuntimeError):
    """A node in the output store that the store did not write (never touched)."""


def _kind(attrs: Any) -> Any:
    """``attrs["segmote"]["kind"]``, or ``None`` when the attrs are malformed."""
    seg = attrs.get("segmote") if isinstance(attrs, dict) else None
    return seg.get("kind") if isinstance(seg, dict) else None


def signature_hash(signature: dict[str, Any]) -> str:
    """sha256 of the signature's canonical JSON."""
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


class OutputStore:
    """Opens or creates ``OUT.zarr`` for one signature.

    Args:
        path: the output store (never the input cohort nor inside it).
        cohort: the input cohort path (checked, recorded).
        signature: model + configuration signature of this run.
        overwrite: replace outputs of another signature instead of refusing (only case groups
            this store wrote are ever deleted: see :meth:`owns`).
        inputs: other files the run reads (checkpoints): checked to lie outside ``path``.
        lock: the store's :class:`~segmote_core.locking.StoreLock`, held by the caller; without
            one the store takes its own (:meth:`close` releases it).
    Raises:
        OutputStoreMismatchError: the store holds another signature and ``overwrite`` is false.
        ValueError: ``path`` is the cohort, inside it, or an unrelated zarr/file.
    """

    def __init__(self, path: str | Path, cohort: str | Path, signature: dict[str, Any],
                 overwrite: bool = False, inputs: Sequence[str | Path] = (),
                 lock: StoreLock | None = None, skip_reviewed: bool = False) -> None:

        self.path = Path(path).resolve()
        self.skip_reviewed = skip_reviewed
        self._staged: dict[str, Path] = {}
        cohort = Path(cohort).resolve()
        self.precheck(self.path, cohort, inputs)
        self._own_lock = lock is None
        self.lock = lock if lock is not None else StoreLock(self.path, "an OutputStore")
        if not self.lock.held or lock_path(self.path) != self.lock.path:
            raise ValueError(f"{self.path}: the lock passed is not this store's held lock")
        try:
            self._open(cohort, signature, overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, cohort: Path, signature: dict[str, Any], overwrite: bool) -> None:
        import zarr

        self.signature = signature
        self.sha = signature_hash(signature)
        if self.path.exists():
            try:
                self.root = zarr.open_group(str(self.path), mode="r+")
            except Exception as exc:  # noqa: BLE001 - zarr raises several types
                raise ValueError(f"{self.path} exists and is not a zarr group: {exc}") from exc
            attrs = dict(self.root.attrs)
            if _kind(attrs) != "labels":
                raise ValueError(f"{self.path} exists and is not a SegMoTE labels store "
                                 f"(attrs['segmote'] = {attrs.get('segmote')!r})")
            old = attrs.get("signature_sha256")
            stale = self._foreign_cases()
            if self.skip_reviewed:
                # a new model over an old run: reviewed cases stay as they are, the others are
                # replaced one by one as their new labels complete (begin / finish)
                stale, old = [], None
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
        # label value -> category of a --categories run; a store that held one and now holds
        # binary labels must not keep naming them
        if "label_table" in signature:
            self.root.attrs["label_table"] = signature["label_table"]
        elif "label_table" in self.root.attrs:
            del self.root.attrs["label_table"]

    @staticmethod
    def precheck(path: str | Path, cohort: str | Path, inputs: Sequence[str | Path] = ()) -> None:
        """Cheap checks before any work starts (and before ``--overwrite`` deletes anything):
        the output is not an input, holds no input and lies in no input; it is not an unrelated
        store. Paths are compared resolved (symlinks followed).

        Raises:
            ValueError: naming the path and the problem.
        """
        path, cohort = Path(path).resolve(), Path(cohort).resolve()
        if path == cohort or cohort in path.parents:
            raise ValueError(f"output {path} is the input cohort or inside it; the input "
                             f"is never written to: choose another output path")
        for name, where in [("input cohort", cohort)] + [("input", Path(p).resolve())
                                                          for p in inputs if p]:
            if path in where.parents:
                raise ValueError(f"the {name} {where} lies inside the output {path}; the "
                                 f"output store would hold (and --overwrite could delete) an "
                                 f"input: move the input out of it or choose another output")
        if path.exists():
            kind = None
            try:
                attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
                kind = _kind(attrs)
            except (OSError, ValueError, AttributeError):
                pass
            if kind != "labels":
                raise ValueError(f"{path} exists and is not a SegMoTE labels store; choose "
                                 f"another output path")

    @staticmethod
    def probe(path: str | Path) -> None:
        """Write, sync and remove a small file where the store's files will go (the store, or
        its folder when it does not exist yet), so that a read-only or full disk is found
        before any work starts.

        Raises:
            OutputNotWritableError: naming the folder and the OS error.
        """
        path = Path(path).resolve()
        folder = path if path.exists() else path.parent
        probe = folder / f".segmote-write-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputNotWritableError(
                f"cannot write to {folder} ({exc.strerror or exc}): the output {path} needs a "
                f"writable folder with free space; fix that or choose another output") from exc

    def _foreign_cases(self) -> list[str]:
        """Complete cases this store wrote under another signature."""
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

    def owns(self, name: str) -> bool:
        """True when ``name`` is a case group this store wrote: a group holding exactly one
        array, ``labels``, signed by a run (``signature_sha256`` in its attrs). Nothing else in
        the folder (a cohort someone put there, a user's own arrays, files) is ever deleted or
        written over."""
        try:
            if name not in self.root:
                return False
            group = self.root[name]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not recognized as a component")
                members = [k for k, _ in group.members()]
            if members != ["labels"] or dict(group.attrs):
                return False
            return "signature_sha256" in dict(group["labels"].attrs)
        except Exception:  # noqa: BLE001 - unreadable: not provably ours, so not touched
            return False

    def _case_attrs(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for name, group in self._groups():
            if not self.owns(name):
                continue
            try:
                out.append((name, dict(group["labels"].attrs)))
            except Exception:  # noqa: BLE001 - half-written metadata: treated as incomplete
                out.append((name, {}))
        return out

    def _drop_foreign(self, names: list[str] | None) -> None:
        names = names if names is not None else [n for n, _ in self._groups()]
        mine = [n for n in names if self.owns(n)]
        kept = sorted(set(names) - set(mine))
        if kept:
            log.warning("--overwrite: %s: not deleting %s (not written by segmote batch)",
                        self.path, ", ".join(kept[:10]))
        log.warning("--overwrite: deleting %d case(s) of another signature from %s",
                    len(mine), self.path)
        for name in mine:
            del self.root[name]

    def _done_attrs(self, case_id: str) -> dict[str, Any] | None:
        """The attrs of a case complete under this run's signature, else ``None``."""
        try:
            if not self.owns(case_id):
                return None
            attrs = dict(self.root[case_id]["labels"].attrs)
        except Exception:  # noqa: BLE001 - unreadable metadata: not complete
            return None
        if attrs.get("complete") is True and attrs.get("signature_sha256") == self.sha:
            return attrs
        return None

    def is_complete(self, case_id: str, input_signature: dict[str, Any] | None = None) -> bool:
        """True only for a case whose ``complete`` flag is set under this run's signature and,
        when ``input_signature`` is given, made from that version of the input case."""
        attrs = self._done_attrs(case_id)
        if attrs is None:
            return False
        return input_signature is None or attrs.get("input_signature") == input_signature

    def input_changed(self, case_id: str, input_signature: dict[str, Any]) -> bool:
        """True when the case is complete under this signature but was made from another
        version of the input case (rewritten since): its labels are stale."""
        attrs = self._done_attrs(case_id)
        return attrs is not None and attrs.get("input_signature") != input_signature

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self.root[case_id]["labels"].attrs)

    def is_reviewed(self, case_id: str) -> bool:
        """A complete case someone reviewed: a saved correction in ``corrections/<case>``, or
        its labels marked ``reviewed: true``."""
        from segmote_core.review import read_correction

        try:
            if self.owns(case_id) and self.case_attrs(case_id).get("reviewed") is True:
                return True
            return read_correction(self.path, case_id, data=False) is not None
        except Exception:  # noqa: BLE001 - no readable correction: not reviewed
            return False

    def _labels(self, case_id: str) -> Any:
        import zarr

        if case_id in self._staged:
            return zarr.open_group(str(self._staged[case_id]), mode="r+")["labels"]
        return self.root[case_id]["labels"]

    def begin(self, case_id: str, shape: tuple[int, ...], dtype: str = "uint8") -> Any:
        """(Re)create ``<case>/labels`` with ``complete: false``; stale contents are deleted."""
        import zarr

        group = None
        if case_id in self.root:
            if not self.owns(case_id):
                raise ForeignNodeError(f"{self.path}/{case_id} exists and was not written by "
                                       f"segmote batch: it is left as it is; move it away to "
                                       f"segment this case")
            if self.skip_reviewed and self.case_attrs(case_id).get("complete") is True:
                # the old pre-label stays readable until the new one is complete (finish)
                # (a folder without zarr.json: not a member of the store's hierarchy)
                staged = self.path / ".staging" / case_id
                shutil.rmtree(staged, ignore_errors=True)
                group = zarr.open_group(str(staged), mode="w")
                self._staged[case_id] = staged
            else:
                log.info("%s: redoing case %s", self.path, case_id)
                del self.root[case_id]
        chunks = (1, *shape[1:]) if len(shape) == 3 else tuple(shape)
        group = group if group is not None else self.root.create_group(case_id)
        arr = group.create_array(
            "labels", shape=tuple(shape), dtype=dtype, chunks=chunks, fill_value=0)
        arr.attrs.update({"complete": False, "signature_sha256": self.sha})
        return arr

    def write(self, case_id: str, start: int, labels: np.ndarray) -> None:
        """Write ``labels`` ``(B, Y, X)`` at slices ``start..``; 2D cases take ``B == 1``."""
        arr = self._labels(case_id)
        if arr.ndim == 2:
            arr[...] = labels[0]
        else:
            arr[start:start + len(labels)] = labels

    def finish(self, case_id: str, confidence: np.ndarray, expert: np.ndarray,
               extra: dict[str, Any]) -> None:
        """Sign the case with per-slice results, then set ``complete: true`` (a separate, last
        metadata write)."""
        arr = self._labels(case_id)
        arr.attrs.update({
            **extra,
            "signature": self.signature, "signature_sha256": self.sha,
            "confidence": [None if not math.isfinite(float(c)) else round(float(c), 6)
                           for c in confidence],
            "expert": [int(e) for e in expert],
        })
        arr.attrs["complete"] = True
        staged = self._staged.pop(case_id, None)
        if staged is not None:  # swap the complete new case in for the old one
            from segmote_core.fileio import atomic_write_dir

            atomic_write_dir(self.path / case_id, lambda tmp: os.replace(staged, tmp))
            try:
                staged.parent.rmdir()      # the last staged case: no empty folder left behind
            except OSError:
                pass

    def close(self) -> None:
        """Release the lock the store took itself (a caller's lock stays with the caller)."""
        if self._own_lock:
            self.lock.release()

    def __enter__(self) -> "OutputStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def discard(self, case_id: str) -> None:
        """Remove a failed case's partial output (a rerun redoes it)."""
        staged = self._staged.pop(case_id, None)
        if staged is not None:  # the old pre-label was never touched
            shutil.rmtree(staged, ignore_errors=True)
            return
        if self.owns(case_id):
            del self.root[case_id]
