"""AnnotationSession: interactive annotation of one image, free of any GUI (plain arrays).

The napari plugin drives it from its widget; a script or another GUI can drive it the same way
(prompt a slice, read ``current``, commit, undo, propagate, run PPT).

One session annotates one image: ``(Y, X)`` grey, ``(Y, X, 3)`` RGB, ``(Z, Y, X)`` volume or
``(Z, Y, X, 3)`` RGB stack. Internally every image is a stack of slices (2D images are one slice,
``z = 0``). The session holds

- ``current``: the object being prompted, uint8 ``(Z, Y, X)`` (``(Y, X)`` for 2D), 0/1;
- ``committed``: the kept objects, int32, one id per object (next free id on commit);
- an undo stack of commits, and the last prediction (routed expert, confidence, heat maps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Generator, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .embeddings import EmbeddingStore
from .predictor import Prediction, SegMoTEPredictor
from .progress import CancelToken, callback_steps
from .volume import (PredictorSegmenter, PropagationConfig, PropagationResult, SlicePrompt,
                     prompt_from_mask, propagate, segment_volume_auto)

__all__ = ["AnnotationSession", "SlicePrediction", "MissingEmbeddingError", "mask_to_logits"]

log = logging.getLogger(__name__)


class MissingEmbeddingError(RuntimeError):
    """The slice has no embedding yet: compute it (in a worker) first."""

    def __init__(self, z: int) -> None:
        super().__init__(f"slice {z} has no embedding yet")
        self.z = z


@dataclass
class SlicePrediction:
    """What one decoder call (prompted or PPT) produced for slice ``z`` of a session."""

    z: int
    mask: np.ndarray            # (Y, X) bool
    score: float                # IoU-head score of the mask
    expert: int | None          # routed expert e* (None without experts)
    token: int | None           # selected expert token t*
    confidence: float | None    # router confidence in [0, 1]


@dataclass
class _Commit:
    label: int
    index: np.ndarray           # flat indices written
    previous: np.ndarray        # their values before the commit


def mask_to_logits(mask: np.ndarray, image_size: int, low_res: int) -> np.ndarray:
    """A binary ``(Y, X)`` mask -> ``(1, low_res, low_res)`` logits in the padded encoder frame.

    The mask goes through the image's own geometry (longest side to ``image_size``, padding
    bottom/right), then is area-averaged to the low-res grid; the fraction becomes a logit.
    """
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    y, x = m.shape[-2:]
    scale = image_size / max(y, x)
    ny, nx = int(y * scale + 0.5), int(x * scale + 0.5)
    m = F.interpolate(m, size=(ny, nx), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, image_size - nx, 0, image_size - ny))
    m = F.adaptive_avg_pool2d(m, low_res).clamp(1e-3, 1 - 1e-3)
    return torch.logit(m)[0].numpy()


class AnnotationSession:
    """Interactive annotation of one image with one SegMoTE model.

    Args:
        image: ``(Y, X)``, ``(Y, X, 3)``, ``(Z, Y, X)`` or ``(Z, Y, X, 3)``; numpy, dask or zarr.
        predictor: the main-thread predictor (decoder calls); its model encodes in workers too.
        rgb: whether the last axis holds RGB channels.
        modality, window: intensity normalisation (``segmote_core.transforms``).
        store: where embeddings live (default: memory only).
    """

    def __init__(self, image: Any, predictor: SegMoTEPredictor, *, rgb: bool = False,
                 modality: str = "auto", window: Any = None,
                 store: EmbeddingStore | None = None) -> None:
        ndim = len(image.shape) - int(rgb)
        if ndim not in (2, 3):
            raise ValueError(f"expected a 2D or 3D image (rgb={rgb}), got shape {image.shape}")
        if rgb and image.shape[-1] not in (3, 4):
            raise ValueError(f"an RGB image needs 3 or 4 channels last, got shape {image.shape}")
        self.image = image
        self.rgb = rgb
        self.is_volume = ndim == 3
        self.predictor = predictor
        self.modality = modality
        self.window = window
        self.store = store if store is not None else EmbeddingStore()
        spatial = tuple(int(s) for s in image.shape[: ndim])
        self.shape = spatial
        self.current = np.zeros(spatial, dtype=np.uint8)
        self.committed = np.zeros(spatial, dtype=np.int32)
        self._undo: list[_Commit] = []
        self._loaded_z: int | None = None
        self.last: SlicePrediction | None = None
        self.auto_results: dict[int, SlicePrediction] = {}
        self.propagation: PropagationResult | None = None

    # ------------------------------------------------------------------ geometry
    @property
    def n_slices(self) -> int:
        return self.shape[0] if self.is_volume else 1

    def slice_image(self, z: int) -> np.ndarray:
        """The ``(Y, X)`` or ``(Y, X, 3)`` image of slice ``z`` (0 for 2D images)."""
        self._check_z(z)
        data = self.image[z] if self.is_volume else self.image
        data = np.asarray(data)
        return data[..., :3] if self.rgb else data

    def plane(self, array: np.ndarray, z: int) -> np.ndarray:
        """A writable view of slice ``z`` of ``current`` or ``committed``."""
        return array[z] if self.is_volume else array

    def _check_z(self, z: int) -> None:
        if not 0 <= z < self.n_slices:
            raise IndexError(f"slice {z} outside [0, {self.n_slices})")

    # ------------------------------------------------------------------ embeddings
    def has_embedding(self, z: int) -> bool:
        return z in self.store

    def embedding_steps(self, zs: list[int] | None = None, cancel: CancelToken | None = None,
                        batch: int = 4) -> Iterator[tuple[int, int]]:
        """Generator computing missing embeddings (all slices by default), ``batch`` per
        encoder call; yields ``(done, total)`` (see :meth:`EmbeddingStore.compute_steps`)."""
        zs = list(range(self.n_slices)) if zs is None else zs
        return self.store.compute_steps(self.predictor, self.slice_image, zs, self.modality,
                                        self.window, cancel, batch)

    def _load(self, z: int) -> None:
        if self._loaded_z == z:
            return
        emb = self.store.get(z)
        if emb is None:
            raise MissingEmbeddingError(z)
        self.predictor.set_embedding(emb)
        self._loaded_z = z

    # ------------------------------------------------------------------ prompting
    def predict(self, z: int, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask: np.ndarray | None = None,
                auto: bool = False, text: str | None = None) -> SlicePrediction | None:
        """Run the decoder on slice ``z`` and write the mask into ``current[z]``.

        Args:
            points: (P, 2) XY pixels; labels: (P,) 1 positive, 0 negative.
            box: (4,) XYXY pixels.
            mask: (Y, X) binary mask prompt (e.g. an object of another Labels layer).
            auto: PPT, prompt-free.
            text: a category of the model's vocabulary, the text guide beside the prompt.
        Returns:
            The result, or ``None`` when there is no prompt (``current[z]`` is then cleared).
        Raises:
            MissingEmbeddingError: slice ``z`` was not embedded yet.
        """
        self._check_z(z)
        has_points = points is not None and len(points) > 0
        if not (has_points or box is not None or mask is not None or auto):
            self.plane(self.current, z)[:] = 0
            self.last = None
            return None
        self._load(z)
        mask_input = None
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != self.shape[-2:]:
                raise ValueError(f"mask prompt of shape {mask.shape} does not match the slice "
                                 f"shape {self.shape[-2:]}")
            cfg = self.predictor.model.config
            mask_input = mask_to_logits(mask, cfg.resolved_image_size, 4 * cfg.embedding_size)
        pred: Prediction = self.predictor.predict(
            point_coords=np.asarray(points, np.float32) if has_points else None,
            point_labels=np.asarray(labels) if has_points else None,
            box=None if box is None else np.asarray(box, np.float32),
            mask_input=mask_input, auto=auto and not has_points and box is None, text=text)
        result = SlicePrediction(z, pred.masks[0].astype(bool), float(pred.scores[0]),
                                 pred.expert, pred.expert_token, pred.confidence)
        self.plane(self.current, z)[:] = result.mask
        self.last = result
        return result

    def routing_heatmap(self) -> np.ndarray:
        """(E, Y, X) routing heat maps of the last prediction: where each expert attended."""
        if self.last is None:
            raise RuntimeError("no prediction yet: prompt the model first")
        return self.predictor.routing_heatmaps()

    def auto_steps(self, zs: list[int] | None = None, cancel: CancelToken | None = None,
                   chunk: int = 4, text: str | None = None
                   ) -> Generator[tuple[int, int], None, None]:
        """Generator: PPT on each slice of ``zs`` (all by default) into ``current``;
        ``text``: segment this category of the model's vocabulary (category-conditioned PPT).

        Runs ``segmote_core.volume.segment_volume_auto`` over this session's embedding store
        (embedded slices skip the encoder, new embeddings are kept), ``chunk`` slices at a
        time in a helper thread; yields ``(done, total)``. The per-slice results land in
        :attr:`auto_results`. The main-thread predictor is not touched, so prompting stays free.
        """
        zs = list(range(self.n_slices)) if zs is None else [int(z) for z in zs]
        for z in zs:
            self._check_z(z)
        self.store.check_compatible(self.predictor, self.modality, self.window)
        self.auto_results = {}
        out = self.current if self.is_volume else self.current[None]
        precision = "bf16" if self.predictor.bf16 else "fp32"
        res = yield from callback_steps(lambda progress: segment_volume_auto(
            self.predictor.model, _Slices(self), self.modality, window=self.window, chunk=chunk,
            out=out, precision=precision, slices=zs, embeddings=self.store, progress=progress,
            cancel=cancel, text=text))
        for z in zs:
            self.auto_results[z] = SlicePrediction(
                z, out[z].astype(bool), float(res.score[z]),
                None if res.expert[z] < 0 else int(res.expert[z]),
                None if res.token[z] < 0 else int(res.token[z]),
                None if np.isnan(res.confidence[z]) else float(res.confidence[z]))

    # ------------------------------------------------------------------ objects
    def next_label(self) -> int:
        return int(self.committed.max()) + 1

    def commit(self, overwrite: bool = False) -> int:
        """Copy ``current`` into ``committed`` under the next free id; clear ``current``.

        Earlier objects are kept: only background voxels are written unless ``overwrite``.
        Returns the new id. Raises ``ValueError`` when the current object is empty.
        """
        region = self.current.astype(bool)
        if not overwrite:
            region &= self.committed == 0
        index = np.flatnonzero(region)
        if index.size == 0:
            raise ValueError("nothing to commit: the current object is empty" if not
                             self.current.any() else "nothing to commit: the current object "
                             "lies entirely on committed objects")
        label = self.next_label()
        flat = self.committed.reshape(-1)
        self._undo.append(_Commit(label, index, flat[index].copy()))
        flat[index] = label
        self.clear()
        log.info("committed object %d (%d voxels)", label, index.size)
        return label

    def undo(self) -> int | None:
        """Revert the last commit; returns its id, or ``None`` when there is nothing to undo."""
        if not self._undo:
            return None
        rec = self._undo.pop()
        self.committed.reshape(-1)[rec.index] = rec.previous
        return rec.label

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def clear(self) -> None:
        self.current[:] = 0
        self.last = None

    # ------------------------------------------------------------------ volumes
    def propagate_steps(self, prompts: dict[int, dict[str, Any]],
                        cancel: CancelToken | None = None,
                        config: PropagationConfig | None = None
                        ) -> Generator[tuple[int, int], None, PropagationResult]:
        """Generator: propagate prompted slices through the volume into ``current``.

        Uses ``segmote_core.volume.propagate`` (its stopping rule is documented there) with a
        worker-owned predictor over this session's embedding store, so embeddings already
        computed are reused and new ones are kept.

        Args:
            prompts: slice -> ``{"points", "labels", "box", "mask"}`` as for :meth:`predict`; a
                slice with only a ``mask`` is prompted by its box and innermost point.
        Returns (as the generator's value): the ``PropagationResult``; ``current`` then holds
        its mask (slices the object does not reach are cleared).
        """
        if not self.is_volume or self.rgb:
            raise ValueError("propagation needs a grey (Z, Y, X) volume")
        slice_prompts: dict[int, SlicePrompt] = {}
        for z, p in prompts.items():
            self._check_z(z)
            points = p.get("points")
            if (points is not None and len(points)) or p.get("box") is not None:
                slice_prompts[int(z)] = SlicePrompt(
                    box=p.get("box"), points=points if points is not None and len(points) else None,
                    labels=p.get("labels") if points is not None and len(points) else None)
            elif p.get("mask") is not None and np.any(p["mask"]):
                slice_prompts[int(z)] = prompt_from_mask(p["mask"])
        if not slice_prompts:
            raise ValueError("nothing to propagate: prompt a slice (points, box or mask) first")
        worker = SegMoTEPredictor(self.predictor.model,
                                  precision="bf16" if self.predictor.bf16 else "fp32")
        segmenter = PredictorSegmenter(worker, self.image,
                                       self.modality, self.window, cache=self.store)
        result = yield from callback_steps(
            lambda progress: propagate(segmenter, slice_prompts, config, progress, cancel))
        self.current[:] = result.mask
        self.last = None
        self.propagation = result
        return result


class _Slices:
    """The session's image as a ``(Z, Y, X[, 3])`` stack read slice by slice (2D: one slice)."""

    def __init__(self, session: AnnotationSession) -> None:
        self._session = session
        n = session.n_slices
        self.shape = (n, *session.shape[-2:], 3) if session.rgb else (n, *session.shape[-2:])

    def __getitem__(self, z: int) -> np.ndarray:
        return self._session.slice_image(int(z))
