"""Reviewed cases as training data: a batch output store's corrections, with their cohort.

A case counts as reviewed when ``OUT.zarr/corrections/<case>`` holds a complete correction
(:func:`segmote_core.review.read_correction`: what the Review panel saves), or when its
pre-label array itself carries ``reviewed: true`` (a store curated by another tool). Its labels
(all ids > 0: the prompt-free mask PPT makes) are the target; the image comes from the cohort
the store records (or the one given, which must be that cohort).

Each slice's encoder outputs come from a signed per-case :class:`~segmote_core.cache.EmbeddingCache`
in ``cache_dir`` (default ``OUT.zarr.embeddings`` beside the store): the encoder runs once per
slice, ever; later fine-tunes (and models of the same encoder) read it back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cache import EmbeddingCache, data_signature
from .inference import embed_slices
from .progress import CancelToken, ProgressCallback, report
from .review import OutputStore, OutputStoreError, open_output, read_correction

__all__ = ["FineTuneDataError", "ReviewedSlice", "ReviewedCase", "reviewed_case_ids",
           "load_reviewed", "default_cache_dir"]

log = logging.getLogger(__name__)


class FineTuneDataError(ValueError):
    """No usable reviewed case, a cohort that does not match the store, or a reviewed case that
    cannot be used (the message names the store, the case and the problem)."""


@dataclass
class ReviewedSlice:
    """One slice of a reviewed case: its cached embedding and its reviewed mask."""

    z: int
    embedding: dict[str, Any]
    target: np.ndarray                # (Y, X) bool, the slice's original size


@dataclass
class ReviewedCase:
    case_id: str
    slices: list[ReviewedSlice] = field(default_factory=list)


def default_cache_dir(store: OutputStore) -> Path:
    return store.path.with_name(store.path.name + ".embeddings")


def reviewed_case_ids(store: OutputStore) -> list[str]:
    """Complete cases with a saved correction or a pre-label marked ``reviewed: true``."""
    out = []
    for case in store.case_ids():
        got = read_correction(store, case, data=False)
        if (got is not None and got[1].get("reviewed") is True) or \
                store.case_attrs(case).get("reviewed") is True:
            out.append(case)
    return out


def _labels(store: OutputStore, case: str) -> np.ndarray:
    got = read_correction(store, case)
    if got is not None:
        return np.asarray(got[0])
    return np.asarray(store.prelabels(case)[...])


def _pick(labels: np.ndarray, max_slices: int) -> list[int]:
    """Slices with foreground, evenly thinned to ``max_slices``, plus the empty slices next to
    them (where a pre-label ran over the organ's end, the correction says "nothing here")."""
    if labels.ndim == 2:
        return [0]
    fg = [int(z) for z in np.flatnonzero((labels > 0).reshape(len(labels), -1).any(1))]
    if len(fg) > max_slices:
        fg = [fg[int(i)] for i in np.linspace(0, len(fg) - 1, max_slices).round()]
    edge = {z for z in (fg[0] - 1, fg[-1] + 1) if 0 <= z < len(labels)} if fg else set()
    return sorted(set(fg) | edge)


def load_reviewed(out: str | Path | OutputStore, predictor: Any, *,
                  cohort: str | Path | None = None, cases: Sequence[str] | None = None,
                  cache_dir: str | Path | None = None, max_slices_per_case: int = 24,
                  progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> list[ReviewedCase]:
    """The reviewed cases of ``out`` with their slices' embeddings and targets.

    Args:
        predictor: a :class:`~segmote_core.predictor.SegMoTEPredictor` of the model to tune
            (its encoder fills the cache where a slice is missing).
        cohort: the store's cohort (default: the one it records); another cohort is refused.
        cases: only these reviewed cases (default: all).
        progress: ``(slices done, slices)`` while embeddings are read or computed.
    Raises:
        FineTuneDataError: see the class.
    """
    try:
        store = out if isinstance(out, OutputStore) else open_output(out)
        recorded = store.cohort_path
        if cohort is not None and Path(cohort).resolve() != recorded.resolve():
            raise FineTuneDataError(
                f"{store.path}: its pre-labels were made from {recorded}, not from {cohort}; "
                "give the store's own cohort")
        source = store.open_cohort()
    except OutputStoreError as exc:
        raise FineTuneDataError(str(exc)) from exc
    reviewed = reviewed_case_ids(store)
    if cases is not None:
        unknown = sorted(set(cases) - set(reviewed))
        if unknown:
            raise FineTuneDataError(f"{store.path}: no reviewed case {unknown} (reviewed: "
                                    f"{reviewed or 'none'})")
        reviewed = [c for c in reviewed if c in set(cases)]
    if not reviewed:
        raise FineTuneDataError(
            f"{store.path}: no reviewed case to learn from: save corrections in the Review "
            f"panel (they go to {store.corrections}) or mark cases reviewed: true")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(store)
    plan = []
    for case_id in reviewed:
        if case_id not in source:
            raise FineTuneDataError(f"{store.path}/{case_id}: the cohort {recorded} has no "
                                    f"such case")
        case = source.case(case_id)
        labels = _labels(store, case_id)
        spatial = tuple(case.image.shape[:2] if case.axes == "YXC" else case.image.shape)
        if labels.shape != spatial:
            raise FineTuneDataError(f"{store.path}/{case_id}: reviewed labels of shape "
                                    f"{labels.shape} do not match the cohort's image "
                                    f"{spatial} ({recorded}/{case_id})")
        plan.append((case, labels, _pick(labels, max_slices_per_case)))
    total = sum(len(zs) for _, _, zs in plan)
    done = 0
    report(progress, 0, total, cancel)
    result = []
    for case, labels, zs in plan:
        volume = case.image
        is_vol = case.axes == "ZYX"
        digest = data_signature(volume)
        cache = EmbeddingCache.for_volume(cache_dir / f"{case.case_id}-{digest[:16]}.zarr",
                                          predictor, volume, modality=case.modality,
                                          n_slices=volume.shape[0] if is_vol else 1,
                                          data_sha256=digest)
        got = {z: cache.get(z) for z in zs}
        todo = [z for z in zs if got[z] is None]
        plane = (lambda z: np.asarray(volume[z])) if is_vol else (lambda z: np.asarray(volume))
        for part in embed_slices(predictor.model, plane, todo, case.modality, batch=4,
                                 bf16=bool(getattr(predictor, "bf16", False))):
            for z, emb in part:
                got[z] = cache.put(z, emb)
            done += len(part)
            report(progress, done, total, cancel)
        done += len(zs) - len(todo)
        report(progress, done, total, cancel)
        rc = ReviewedCase(case.case_id, [
            ReviewedSlice(z, got[z], (labels[z] if is_vol else labels) > 0) for z in zs])
        result.append(rc)
        log.info("%s: %d reviewed slice(s), %d embedded now", case.case_id, len(zs), len(todo))
    return result
