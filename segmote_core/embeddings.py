"""Per-slice embeddings of an image under annotation: memory, an optional signed disk cache.

:class:`EmbeddingStore` keeps :meth:`SegMoTEPredictor.get_embedding` dicts by slice index. With
an :class:`~segmote_core.cache.EmbeddingCache` behind it (:meth:`EmbeddingStore.on_disk`),
embeddings survive a restart, and a changed model or image raises
``EmbeddingCacheMismatchError`` rather than serving stale ones. :meth:`EmbeddingStore.compute_steps` fills the missing slices with
:func:`segmote_core.inference.embed_slices`, the same batched encoder path as
``EmbeddingCache.compute_volume``, and reports ``(done, total)`` as a generator so a GUI worker
can show progress and cancel between batches.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .cache import EmbeddingCache, data_signature
from .inference import embed_slices
from .predictor import SegMoTEPredictor
from .progress import CancelToken

__all__ = ["EmbeddingStore", "Embedding"]

log = logging.getLogger(__name__)

#: One slice's embedding: the dict of ``SegMoTEPredictor.get_embedding``.
Embedding = dict[str, Any]


class EmbeddingStore:
    """Embeddings by slice index, in memory, optionally backed by a signed zarr cache.

    Thread-safe: a worker thread fills it while the main thread reads.

    Args:
        cache: an :class:`~segmote_core.cache.EmbeddingCache` (or anything with ``get(z)`` and
            ``put(z, embedding)``), or ``None`` for memory only.
        max_in_memory: with a cache, how many slices stay in memory as well (least recently
            used go first; a vit_b slice takes ~17 MB in memory, ~2 MiB in the cache).
            Without a cache everything stays.
    """

    def __init__(self, cache: Any | None = None, max_in_memory: int = 32) -> None:
        self._mem: OrderedDict[int, Embedding] = OrderedDict()
        self.cache = cache
        self._max = max_in_memory if cache is not None else None
        self._lock = threading.Lock()

    @classmethod
    def on_disk(cls, folder: str | Path, predictor: SegMoTEPredictor, image: Any, n_slices: int,
                modality: str = "auto", window: Any = None) -> "EmbeddingStore":
        """A store backed by an ``EmbeddingCache`` in ``folder``, signed as ``for_volume`` signs.

        The zarr store is named by the image's content hash, so reopening the same image with
        the same model reuses it.
        """
        digest = data_signature(image)
        path = Path(folder) / f"embeddings-{digest[:16]}.zarr"
        log.info("embedding cache: %s", path)
        return cls(EmbeddingCache.for_volume(path, predictor, image, modality=modality,
                                             window=window, n_slices=n_slices,
                                             data_sha256=digest))

    def _remember(self, z: int, emb: Embedding) -> None:
        with self._lock:
            self._mem[z] = emb
            self._mem.move_to_end(z)
            while self._max is not None and len(self._mem) > self._max:
                self._mem.popitem(last=False)

    def __contains__(self, z: int) -> bool:
        return self.get(z) is not None

    def get(self, z: int) -> Embedding | None:
        with self._lock:
            emb = self._mem.get(int(z))
        if emb is None and self.cache is not None:
            emb = self.cache.get(int(z))
            if emb is not None:
                self._remember(int(z), emb)
        return emb

    def put(self, z: int, embedding: Embedding) -> None:
        if self.cache is not None:  # keep what the cache returns: the same masks after a restart
            stored = self.cache.put(int(z), embedding)
            embedding = stored if isinstance(stored, dict) else embedding
        self._remember(int(z), embedding)

    def missing(self, zs: Iterable[int]) -> list[int]:
        return [int(z) for z in zs if self.get(z) is None]

    def __len__(self) -> int:
        """Slices held in memory."""
        return len(self._mem)

    def check_compatible(self, predictor: SegMoTEPredictor, modality: str = "auto",
                         window: Any = None) -> None:
        """Refuse to mix embeddings of another model or normalisation into a signed cache."""
        if self.cache is not None and hasattr(self.cache, "check_compatible"):
            self.cache.check_compatible(predictor, modality, window)

    def compute_steps(self, predictor: SegMoTEPredictor, get_slice: Callable[[int], np.ndarray],
                      zs: Iterable[int], modality: str = "auto", window: Any = None,
                      cancel: CancelToken | None = None, batch: int = 4
                      ) -> Iterator[tuple[int, int]]:
        """Embed the slices of ``zs`` this store lacks, ``batch`` per encoder call.

        A generator: yields ``(0, total)`` first, then ``(done, total)`` after each batch;
        stops with :class:`~segmote_core.progress.Cancelled` between batches once ``cancel`` is
        set (what was computed stays). ``predictor`` gives the model and its encoder precision;
        its current image is left alone, so it may be the one another thread prompts with.
        """
        self.check_compatible(predictor, modality, window)
        todo = self.missing(zs)
        total, done = len(todo), 0
        yield 0, total
        if cancel is not None:
            cancel.raise_if_cancelled()
        for part in embed_slices(predictor.model, lambda z: np.asarray(get_slice(z)), todo,
                                 modality, window, bf16=predictor.bf16, batch=batch):
            for z, emb in part:
                self.put(z, emb)
            done += len(part)
            log.debug("embedded slices %s (%d/%d)", [z for z, _ in part], done, total)
            yield done, total
            if cancel is not None:
                cancel.raise_if_cancelled()
