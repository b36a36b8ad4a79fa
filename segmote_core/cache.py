"""Per-slice encoder outputs in a zarr store, signed so stale embeddings are never returned.

The store's attrs hold a signature: the model (config + a hash of every weight, from
:meth:`SegMoTEPredictor.model_signature`), a hash of the image data, and this package's version.
Opening a store whose signature differs raises
:class:`~segmote_core.errors.EmbeddingCacheMismatchError` naming what changed (pass
``overwrite=True`` to start it afresh). Layout::

    cache.zarr/                   attrs {"segmote": {"kind": "embedding_cache", "version": 1,
                                                     "signature": {...}}}
      image_embeddings            (Z, C, h, w) float32, one chunk per slice
      interm_embeddings           (Z, h, w, D) float32 (models with HQ fusion only)
      sizes                       (Z, 4) int32: original (Y, X), input (Y, X); a row is written
                                  last, so a non-zero row marks its slice complete
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EmbeddingCacheMismatchError
from .io.image import MedicalImage, array_of
from .progress import CancelToken, ProgressCallback, report

__all__ = ["EmbeddingCache", "EmbeddingCacheMismatchError", "data_signature", "CACHE_VERSION"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _n_slices(volume: Any) -> tuple[int, bool]:
    """(number of slices, is a volume) of a MedicalImage or a (Z, Y, X) / 2D array."""
    axes = volume.axes if isinstance(volume, MedicalImage) else None
    if axes is not None:
        return (int(volume.shape[0]), True) if axes == "ZYX" else (1, False)
    shape = tuple(volume.shape)
    is_vol = len(shape) == 3 and shape[-1] not in (3, 4)
    return (shape[0], True) if is_vol else (1, False)


def _slice(volume: Any, z: int, is_volume: bool) -> np.ndarray:
    data = array_of(volume)
    return np.asarray(data[z]) if is_volume else np.asarray(data)


def data_signature(volume: Any) -> str:
    """sha256 over shape, dtype and every voxel, read slice by slice (memory stays one slice).

    Args:
        volume: a :class:`~segmote_core.io.MedicalImage`, a ``(Z, Y, X)`` array-like (numpy,
            dask, zarr) or a 2D image.
    """
    data = array_of(volume)
    n, is_vol = _n_slices(volume)
    h = hashlib.sha256(repr((tuple(int(s) for s in data.shape), str(data.dtype))).encode())
    for z in range(n):
        h.update(np.ascontiguousarray(_slice(volume, z, is_vol)).tobytes())
    return h.hexdigest()


def _normalise(sig: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(sig, sort_keys=True, default=str))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _describe_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    a, b = _flat(stored), _flat(wanted)
    parts = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            sa, sb = str(a.get(key, "<missing>"))[:16], str(b.get(key, "<missing>"))[:16]
            parts.append(f"{key} (cache {sa!r}, now {sb!r})")
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "")


class EmbeddingCache:
    """Signed per-slice embedding store (see the module docstring).

    Args:
        path: the zarr store (a directory, created if absent).
        signature: JSON-able dict, e.g. ``{"model": predictor.model_signature(),
            "data": data_signature(volume)}`` (see :meth:`for_volume`); the package version is
            added here.
        n_slices: number of slices of the volume (grows on demand if omitted).
        overwrite: replace a store with another signature instead of raising.
    Raises:
        EmbeddingCacheMismatchError: the store exists with another signature (and
            ``overwrite`` is off), or ``path`` is some other zarr store.
    """

    def __init__(self, path: str | Path, signature: dict[str, Any], n_slices: int | None = None,
                 *, overwrite: bool = False) -> None:
        import zarr

        from . import __version__

        self.path = Path(path)
        self.signature = _normalise({**signature, "segmote_version": __version__})
        self.n_slices = n_slices
        self._lock = threading.Lock()
        self._arrays: dict[str, Any] = {}
        if self.path.exists():
            try:
                root = zarr.open_group(str(self.path), mode="r+")
                seg = dict(root.attrs).get("segmote") or {}
            except Exception as exc:  # not a zarr group at all
                seg, root = {"kind": f"unreadable ({type(exc).__name__})"}, None
            if seg.get("kind") != "embedding_cache" or seg.get("signature") != self.signature:
                if not overwrite:
                    if seg.get("kind") != "embedding_cache":
                        raise EmbeddingCacheMismatchError(
                            f"{self.path}: not a SegMoTE embedding cache (kind "
                            f"{seg.get('kind')!r}); choose another path")
                    raise EmbeddingCacheMismatchError(
                        f"{self.path}: embedding cache was computed for other inputs: "
                        f"{_describe_diff(seg.get('signature') or {}, self.signature)}. Delete "
                        f"it or open with overwrite=True to recompute")
                log.warning("%s: replacing an embedding cache with another signature", self.path)
                shutil.rmtree(self.path)
                root = None
            if root is not None:
                self.root = root
                for name in ("image_embeddings", "interm_embeddings", "sizes"):
                    if name in root:
                        self._arrays[name] = root[name]
                return
        self.root = zarr.open_group(str(self.path), mode="w")
        self.root.attrs["segmote"] = {"kind": "embedding_cache", "version": CACHE_VERSION,
                                      "signature": self.signature}

    @classmethod
    def for_volume(cls, path: str | Path, predictor: Any, volume: Any, *,
                   modality: str = "auto", window: Any = None, overwrite: bool = False,
                   n_slices: int | None = None, data_sha256: str | None = None
                   ) -> "EmbeddingCache":
        """A cache signed with ``predictor``'s model, ``volume``'s data and the normalisation.

        ``n_slices`` and ``data_sha256`` (:func:`data_signature` of ``volume``) may be given
        when the caller knows them (an RGB stack's slice count; a hash already computed).
        """
        n = _n_slices(volume)[0] if n_slices is None else int(n_slices)
        sig = {"model": predictor.model_signature(),
               "data_sha256": data_sha256 or data_signature(volume),
               "modality": str(modality), "window": window}
        return cls(path, sig, n_slices=n, overwrite=overwrite)

    def check_compatible(self, predictor: Any = None, modality: str | None = None,
                         window: Any = None) -> None:
        """Refuse to fill this cache with embeddings of another model or normalisation.

        Compares ``predictor.model_signature()``, ``modality`` and ``window`` with the
        ``"model"``, ``"modality"`` and ``"window"`` entries of the signature (those present).
        Raises:
            EmbeddingCacheMismatchError: naming the entries that differ.
        """
        given: dict[str, Any] = {"modality": None if modality is None else str(modality),
                                 "window": window}
        if predictor is not None and hasattr(predictor, "model_signature"):
            given["model"] = predictor.model_signature()
        stored = {k: self.signature[k] for k in given if k in self.signature}
        wanted = _normalise({k: given[k] for k in stored})
        if k_diff := _describe_diff(stored, wanted):
            raise EmbeddingCacheMismatchError(f"{self.path}: asked to compute embeddings that "
                                              f"differ from the cache's signature: {k_diff}")

    # ------------------------------------------------------------------ storage
    def _ensure(self, z: int, emb: dict[str, Any]) -> None:
        n = max(int(self.n_slices or 0), z + 1)
        with self._lock:
            for name in ("image_embeddings", "interm_embeddings"):
                if name not in emb:
                    continue
                arr = np.asarray(emb[name])
                if name not in self._arrays:
                    self._arrays[name] = self.root.create_array(
                        name, shape=(n, *arr.shape), dtype=np.float32, chunks=(1, *arr.shape),
                        fill_value=0.0)
                elif tuple(self._arrays[name].shape[1:]) != arr.shape:
                    raise ValueError(f"{self.path}: {name} of shape {arr.shape} does not match "
                                     f"the cache's {tuple(self._arrays[name].shape[1:])}")
            if "sizes" not in self._arrays:
                self._arrays["sizes"] = self.root.create_array(
                    "sizes", shape=(n, 4), dtype=np.int32, chunks=(1, 4), fill_value=0)
            for arr in self._arrays.values():
                if arr.shape[0] <= z:
                    arr.resize((z + 1, *arr.shape[1:]))

    def put(self, z: int, embedding: dict[str, Any]) -> None:
        """Store slice ``z``'s :meth:`SegMoTEPredictor.get_embedding` dict."""
        z = int(z)
        if z < 0:
            raise IndexError(f"{self.path}: negative slice index {z}")
        self._ensure(z, embedding)
        for name in ("image_embeddings", "interm_embeddings"):
            if name in embedding:
                self._arrays[name][z] = np.asarray(embedding[name], dtype=np.float32)
        sizes = [*embedding["original_size"], *embedding["input_size"]]
        self._arrays["sizes"][z] = np.asarray(sizes, dtype=np.int32)   # completion marker last

    def get(self, z: int) -> dict[str, Any] | None:
        """Slice ``z``'s embedding dict, or ``None`` if it was never stored completely."""
        sizes = self._arrays.get("sizes")
        z = int(z)
        if sizes is None or not 0 <= z < sizes.shape[0]:
            return None
        row = np.asarray(sizes[z])
        if row[0] <= 0:
            return None
        out: dict[str, Any] = {"original_size": (int(row[0]), int(row[1])),
                               "input_size": (int(row[2]), int(row[3]))}
        for name in ("image_embeddings", "interm_embeddings"):
            if name in self._arrays:
                out[name] = np.asarray(self._arrays[name][z])
        return out

    def __contains__(self, z: int) -> bool:
        return self.get(z) is not None

    def done_slices(self) -> list[int]:
        sizes = self._arrays.get("sizes")
        if sizes is None:
            return []
        return [int(z) for z in np.flatnonzero(np.asarray(sizes[:, 0]) > 0)]

    # ------------------------------------------------------------------ computation
    def compute_volume(self, volume: Any, predictor: Any, modality: str = "auto",
                       window: Any = None, progress: ProgressCallback | None = None,
                       cancel: CancelToken | None = None, batch: int = 4) -> int:
        """Embed every slice not yet cached, ``batch`` slices in memory at a time.

        The embeddings are those of ``predictor.set_image`` + ``get_embedding`` (same
        normalisation, resize and encoder precision), computed ``batch`` slices per encoder call.

        Args:
            volume: :class:`~segmote_core.io.MedicalImage`, ``(Z, Y, X)`` array-like, or 2D image.
            predictor: a :class:`~segmote_core.predictor.SegMoTEPredictor` (gives the model and
                its encoder precision; its current image is left alone).
            progress: ``progress(done, total)`` over all slices (cached ones count as done).
            cancel: stops with :class:`~segmote_core.progress.Cancelled` between batches; what
                was computed stays cached, so a rerun resumes.
        Returns:
            The number of slices computed (0 when everything came from the cache).
        """
        from .inference import embed_slices

        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.check_compatible(predictor, modality, window)
        n, is_vol = _n_slices(volume)
        if self.n_slices is not None and n != self.n_slices:
            raise EmbeddingCacheMismatchError(f"{self.path}: the cache is for {self.n_slices} "
                                              f"slice(s), the volume given has {n}")
        cached = set(self.done_slices())
        todo = [z for z in range(n) if z not in cached]
        done = n - len(todo)
        report(progress, done, n, cancel)
        for part in embed_slices(predictor.model, lambda z: _slice(volume, z, is_vol), todo,
                                 modality, window, batch=batch,
                                 bf16=bool(getattr(predictor, "bf16", False))):
            for z, entry in part:
                self.put(z, entry)
            done += len(part)
            report(progress, done, n, cancel)
        log.info("%s: %d slice(s) embedded, %d from the cache", self.path, len(todo),
                 n - len(todo))
        return len(todo)
