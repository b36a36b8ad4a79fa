"""Per-slice embeddings of the annotated image: memory store, optional on-disk cache, computation.

The store keeps ``SegMoTEPredictor.get_embedding()`` dicts by slice index. With a disk cache
(``segmote_core.cache.EmbeddingCache``, signed with the model and data) embeddings survive a
restart of napari. :func:`embedding_steps` is the generator the plugin runs in a thread worker:
it computes the missing slices with its own predictor and yields ``(done, total)``.
"""

from __future__ import annotations

import logging
import queue
from collections import OrderedDict
import threading
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, TypeVar

import numpy as np

from segmote_core.predictor import SegMoTEPredictor
from segmote_core.progress import CancelToken

__all__ = ["EmbeddingStore", "embedding_steps", "callback_steps"]

log = logging.getLogger(__name__)

Embedding = dict[str, Any]
T = TypeVar("T")


class EmbeddingStore:
    """Embeddings by slice index, in memory, optionally backed by a signed zarr cache.

    Args:
        cache: an object with ``get(z) -> dict | None`` and ``put(z, embedding)`` (the
            ``segmote_core.cache.EmbeddingCache`` interface), or ``None`` for memory only.
        max_in_memory: with a cache, how many slices stay in memory as well (least recently
            used go first; a vit_b slice takes ~17 MB). Without a cache everything stays.
    """

    def __init__(self, cache: Any | None = None, max_in_memory: int = 32) -> None:
        self._mem: OrderedDict[int, Embedding] = OrderedDict()
        self._cache = cache
        self._max = max_in_memory if cache is not None else None
        self._lock = threading.Lock()

    def _remember(self, z: int, emb: Embedding) -> None:
        with self._lock:
            self._mem[z] = emb
            self._mem.move_to_end(z)
            while self._max is not None and len(self._mem) > self._max:
                self._mem.popitem(last=False)

    @classmethod
    def on_disk(cls, folder: str | Path, predictor: SegMoTEPredictor, image: Any, n_slices: int,
                modality: str = "auto", window: Any = None) -> "EmbeddingStore":
        """A store backed by a signed ``segmote_core.cache.EmbeddingCache`` in ``folder``.

        The zarr store is named by the image's content hash, so reopening the same image with
        the same model reuses it; its signature is the one ``EmbeddingCache.for_volume`` writes
        (model, every voxel, normalisation), so a changed model or image raises
        ``CacheMismatchError`` instead of returning stale embeddings.
        """
        from segmote_core.cache import EmbeddingCache, data_signature

        digest = data_signature(image)
        signature = {"model": predictor.model_signature(), "data_sha256": digest,
                     "modality": str(modality), "window": window}
        path = Path(folder) / f"embeddings-{digest[:16]}.zarr"
        log.info("embedding cache: %s", path)
        return cls(EmbeddingCache(path, signature, n_slices=n_slices))

    def __contains__(self, z: int) -> bool:
        return self.get(z) is not None

    def get(self, z: int) -> Embedding | None:
        with self._lock:
            emb = self._mem.get(int(z))
        if emb is None and self._cache is not None:
            emb = self._cache.get(int(z))
            if emb is not None:
                self._remember(int(z), emb)
        return emb

    def put(self, z: int, embedding: Embedding) -> None:
        if self._cache is not None:
            self._cache.put(int(z), embedding)
        self._remember(int(z), embedding)

    def missing(self, zs: Iterable[int]) -> list[int]:
        return [int(z) for z in zs if self.get(z) is None]

    def __len__(self) -> int:
        """Slices held in memory."""
        return len(self._mem)


def embedding_steps(store: EmbeddingStore, predictor: SegMoTEPredictor, zs: Iterable[int],
                    get_slice: Callable[[int], np.ndarray], modality: str = "auto",
                    window: Any = None, cancel: CancelToken | None = None
                    ) -> Iterator[tuple[int, int]]:
    """Compute the embeddings of the slices ``zs`` that ``store`` lacks; yield ``(done, total)``.

    ``predictor`` must not be shared with another thread (the plugin gives each worker its own).
    Stops with ``segmote_core.progress.Cancelled`` once ``cancel`` is set.
    """
    todo = store.missing(zs)
    total = len(todo)
    yield 0, total
    for i, z in enumerate(todo):
        if cancel is not None:
            cancel.raise_if_cancelled()
        predictor.set_image(np.asarray(get_slice(z)), modality=modality, window=window)
        store.put(z, predictor.get_embedding())
        log.debug("embedded slice %d (%d/%d)", z, i + 1, total)
        yield i + 1, total


def callback_steps(run: Callable[[Callable[[int, int], None]], T]
                   ) -> Generator[tuple[int, int], None, T]:
    """Turn a core function that reports ``progress(done, total)`` into a progress generator.

    ``run(progress)`` executes in a helper thread; its progress calls are yielded here (the
    plugin's thread worker forwards them to napari's progress bar), its result is this
    generator's return value and its exception is re-raised here.
    """
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = run(lambda done, total: events.put((int(done), int(total))))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=target, name="segmote-step", daemon=True)
    thread.start()
    while (item := events.get()) is not None:
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
