"""Per-slice encoder outputs in a zarr store, signed so stale embeddings are never returned.

The store's attrs hold a signature: the image encoder (what the stored outputs depend on: base,
input size, which early block feeds the HQ fusion, a hash of the encoder's weights, its
precision, from :meth:`SegMoTEPredictor.encoder_signature`), a hash of the image data, the
normalisation and this package's version. A model whose added parts changed (a fine-tune) keeps
the same encoder, so its cache stays valid: the encoder runs once per slice, ever. Opening a
store whose signature differs raises :class:`~segmote_core.errors.EmbeddingCacheMismatchError`
naming what changed (pass ``overwrite=True`` to start it afresh); so does a store of another
format version. Layout (version 2)::

    cache.zarr/                   attrs {"segmote": {"kind": "embedding_cache", "version": 2,
                                                     "signature": {...}}}
      image_embeddings            (Z, C, h, w) float16, one chunk per slice
      interm_coeffs               (Z, h, w, r) float16  } the early ViT features of the HQ
      interm_basis                (Z, r, D) float16     } fusion (models with HQ fusion only),
      interm_mean                 (Z, D) float32        } rank r <= D per slice (see below)
      sizes                       (Z, 4) int32: original (Y, X), input (Y, X); a row is written
                                  last, so a non-zero row marks its slice complete

Size at cohort scale: a ViT-B slice held 16 MiB raw in version 1 (float32 embedding, 4 MiB, plus
the raw 64 x 64 x 768 early block, 12 MiB). The fusion reads that block through a linear layer
(a 2x2 transposed convolution), and its per-slice spectrum is steep; the early features are
kept in :data:`~segmote_core.interm.INTERM_BUDGET` (1.25 MiB) of float16 coefficients: all
channels where they fit (the tiny model, LiteMedSAM's 160-channel TinyViT stage: plain float16),
else the slice's principal subspace of the rank that fits (ViT-B: 160 of 768: the mean, 160
basis vectors and 160 coefficients per position). With the embedding in float16 a ViT-B slice is 3.5 MiB raw
(less on disk); the masks agree with the float32 ones (``benchmarks/bench_cache_size.py``).
The basis is per slice and does not depend on the model's trainable parts, so fine-tuned
models reuse the cache.
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
from .interm import compress_interm, interm_rank, restore_interm
from .io.image import MedicalImage, array_of
from .progress import CancelToken, ProgressCallback, report

__all__ = ["EmbeddingCache", "EmbeddingCacheMismatchError", "data_signature", "CACHE_VERSION",
           "compress_interm", "restore_interm", "interm_rank"]

log = logging.getLogger(__name__)

CACHE_VERSION = 2

_F16_MAX = float(np.finfo(np.float16).max)
_ARRAYS = ("image_embeddings", "interm_coeffs", "interm_basis", "interm_mean", "sizes")


def _half(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.size and np.abs(a).max() > _F16_MAX:
        raise ValueError(f"{name} overflow float16; they cannot be cached")
    return a.astype(np.float16)


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
            stale = (seg.get("kind") != "embedding_cache" or seg.get("version") != CACHE_VERSION
                     or seg.get("signature") != self.signature)
            if stale:
                if not overwrite:
                    if seg.get("kind") != "embedding_cache":
                        raise EmbeddingCacheMismatchError(
                            f"{self.path}: not a SegMoTE embedding cache (kind "
                            f"{seg.get('kind')!r}); choose another path")
                    if seg.get("version") != CACHE_VERSION:
                        raise EmbeddingCacheMismatchError(
                            f"{self.path}: embedding cache of format version "
                            f"{seg.get('version')!r}; this segmote reads version {CACHE_VERSION} "
                            f"(half-precision embeddings, compressed early features). Delete "
                            f"it or open with overwrite=True to recompute")
                    raise EmbeddingCacheMismatchError(
                        f"{self.path}: embedding cache was computed for other inputs: "
                        f"{_describe_diff(seg.get('signature') or {}, self.signature)}. Delete "
                        f"it or open with overwrite=True to recompute")
                log.warning("%s: replacing an embedding cache with another signature", self.path)
                shutil.rmtree(self.path)
                root = None
            if root is not None:
                self.root = root
                for name in _ARRAYS:
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
        sig = {"encoder": predictor.encoder_signature(),
               "data_sha256": data_sha256 or data_signature(volume),
               "modality": str(modality), "window": window}
        return cls(path, sig, n_slices=n, overwrite=overwrite)

    def check_compatible(self, predictor: Any = None, modality: str | None = None,
                         window: Any = None) -> None:
        """Refuse to fill this cache with embeddings of another model or normalisation.

        Compares ``predictor.encoder_signature()`` (``model_signature()`` for a store signed
        with a whole model), ``modality`` and ``window`` with the ``"encoder"`` (``"model"``),
        ``"modality"`` and ``"window"`` entries of the signature (those present).
        Raises:
            EmbeddingCacheMismatchError: naming the entries that differ.
        """
        given: dict[str, Any] = {"modality": None if modality is None else str(modality),
                                 "window": window}
        if predictor is not None and hasattr(predictor, "encoder_signature"):
            given["encoder"] = predictor.encoder_signature()
        if predictor is not None and "model" in self.signature:
            given["model"] = predictor.model_signature()
        stored = {k: self.signature[k] for k in given if k in self.signature}
        wanted = _normalise({k: given[k] for k in stored})
        if k_diff := _describe_diff(stored, wanted):
            raise EmbeddingCacheMismatchError(f"{self.path}: asked to compute embeddings that "
                                              f"differ from the cache's signature: {k_diff}")

    # ------------------------------------------------------------------ storage
    def _create(self, name: str, shape: tuple[int, ...], dtype: Any, n: int) -> None:
        if name not in self._arrays:
            self._arrays[name] = self.root.create_array(
                name, shape=(n, *shape), dtype=dtype, chunks=(1, *shape), fill_value=0)
        elif tuple(self._arrays[name].shape[1:]) != tuple(shape):
            raise ValueError(f"{self.path}: {name} of shape {tuple(shape)} does not match "
                             f"the cache's {tuple(self._arrays[name].shape[1:])}")

    def _ensure(self, z: int, parts: dict[str, np.ndarray]) -> None:
        n = max(int(self.n_slices or 0), z + 1)
        with self._lock:
            for name, arr in parts.items():
                self._create(name, arr.shape, arr.dtype, n)
            self._create("sizes", (4,), np.int32, n)
            for arr in self._arrays.values():
                if arr.shape[0] <= z:
                    arr.resize((z + 1, *arr.shape[1:]))

    def put(self, z: int, embedding: dict[str, Any]) -> dict[str, Any]:
        """Store slice ``z``'s :meth:`SegMoTEPredictor.get_embedding` dict (half precision,
        the early features as their principal subspace: module docstring).

        Returns the embedding as :meth:`get` will give it back, so a caller that goes on with
        it gets the same masks now as from the cache later."""
        z = int(z)
        if z < 0:
            raise IndexError(f"{self.path}: negative slice index {z}")
        try:
            parts = {"image_embeddings": _half(embedding["image_embeddings"],
                                               "image embeddings")}
            if embedding.get("interm_embeddings") is not None:
                coeffs, basis, mean = compress_interm(embedding["interm_embeddings"])
                parts.update(interm_coeffs=coeffs, interm_basis=basis, interm_mean=mean)
        except ValueError as exc:
            raise ValueError(f"{self.path}: slice {z}: {exc}") from exc
        self._ensure(z, parts)
        for name, arr in parts.items():
            self._arrays[name][z] = arr
        sizes = [*embedding["original_size"], *embedding["input_size"]]
        self._arrays["sizes"][z] = np.asarray(sizes, dtype=np.int32)   # completion marker last
        return self._unpack(sizes, parts)

    @staticmethod
    def _unpack(sizes: Any, parts: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"original_size": (int(sizes[0]), int(sizes[1])),
                               "input_size": (int(sizes[2]), int(sizes[3]))}
        if "image_embeddings" in parts:
            out["image_embeddings"] = np.asarray(parts["image_embeddings"], dtype=np.float32)
        if "interm_coeffs" in parts:
            out["interm_embeddings"] = restore_interm(parts["interm_coeffs"],
                                                      parts["interm_basis"], parts["interm_mean"])
        return out

    def get(self, z: int) -> dict[str, Any] | None:
        """Slice ``z``'s embedding dict (float32 arrays), or ``None`` if it was never stored
        completely."""
        sizes = self._arrays.get("sizes")
        z = int(z)
        if sizes is None or not 0 <= z < sizes.shape[0]:
            return None
        row = np.asarray(sizes[z])
        if row[0] <= 0:
            return None
        return self._unpack(row, {name: self._arrays[name][z] for name in _ARRAYS[:4]
                                  if name in self._arrays})

    def bytes_per_slice(self) -> float:
        """Bytes on disk per stored slice (all chunk files, over the slices done)."""
        files = [f for f in self.path.rglob("*") if f.is_file() and f.name != "zarr.json"]
        return sum(f.stat().st_size for f in files) / max(1, len(self.done_slices()))

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
