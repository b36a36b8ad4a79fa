"""The "does not match" errors: stored work that was made for something else than what now asks
for it (another model, image, normalisation or configuration).

They share one base, :class:`SegMoTEMismatchError` (a ``ValueError``), so a caller can refuse
all stale data in one ``except``; each subclass is named for the store whose signature differed.
Every message names the path and what differed. None of them is ever raised for data that can be
read and matches: stale data is refused, never served as current.
"""

from __future__ import annotations

__all__ = ["SegMoTEMismatchError", "EmbeddingCacheMismatchError", "FeatureCacheMismatchError",
           "OutputStoreMismatchError"]


class SegMoTEMismatchError(ValueError):
    """Stored data was made for another model, input or configuration than the current one."""


class EmbeddingCacheMismatchError(SegMoTEMismatchError):
    """An embedding cache (:class:`segmote_core.cache.EmbeddingCache`) is signed for another
    model, volume, modality, window, slice count or package version; or the folder is not a
    SegMoTE embedding cache at all."""


class FeatureCacheMismatchError(SegMoTEMismatchError):
    """A training feature cache (``training.precompute.FeatureCache``) was made for another
    encoder, image set or input size, or cannot be read; the trainer recomputes it."""


class OutputStoreMismatchError(SegMoTEMismatchError):
    """A batch output store (``pipeline.store.OutputStore``) holds labels of another model or
    run configuration; rerun with ``--overwrite`` to replace them."""
