"""Pre-computed encoder outputs for training with a frozen encoder.

The image encoder is the expensive part of SegMoTE; with it frozen its outputs never change, so
they are computed once per slice and every epoch runs only the decoder side. The cache lives in
memory as float16 tensors and on disk as one ``.safetensors`` file whose metadata signs the
encoder weights, the slice pixels and the image size: a file whose signature differs is refused
(:class:`FeatureCacheMismatchError`) and recomputed, never silently reused.

(The core's per-volume zarr cache serves the predictor; training needs random access to
all slices of a dataset at once, so it keeps this flat tensor form.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from segmote_core.errors import FeatureCacheMismatchError
from segmote_core.fileio import atomic_write
from segmote_core.modeling import ImageFeatures, SegMoTE
from segmote_core.progress import CancelToken, ProgressCallback, report

from .dataset import model_input

__all__ = ["FeatureCacheMismatchError", "FeatureCache", "encoder_signature", "compute_features",
           "load_or_compute_features"]

log = logging.getLogger(__name__)


def _sha(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def encoder_signature(model: SegMoTE, images: np.ndarray) -> dict[str, str]:
    """What the cached features depend on: encoder weights, input pixels, size, HQ branch."""
    enc = model.sam.image_encoder.state_dict()
    weights = _sha(v.detach().float().cpu().numpy() for _, v in sorted(enc.items()))
    return {"encoder": weights, "images": _sha([images]), "image_size": str(model.image_size),
            "interm": str(model.needs_interm), "count": str(len(images)), "padding": "normalised-0"}


@dataclass
class FeatureCache:
    """Encoder outputs of N slices, stored float16.

    Attributes:
        image_embeddings: (N, C, h, w).
        interm_embeddings: (N, h, w, D_vit) or None.
        signature: see :func:`encoder_signature`.
    """

    image_embeddings: torch.Tensor
    interm_embeddings: torch.Tensor | None
    signature: dict[str, str]

    def __len__(self) -> int:
        return int(self.image_embeddings.shape[0])

    def get(self, slice_ids: np.ndarray | list[int], device: torch.device | str = "cpu"
            ) -> ImageFeatures:
        """Features of the given slices as float32 :class:`ImageFeatures` on ``device``."""
        idx = torch.as_tensor(np.asarray(slice_ids), dtype=torch.long)
        emb = self.image_embeddings[idx].to(device=device, dtype=torch.float32)
        interm = (self.interm_embeddings[idx].to(device=device, dtype=torch.float32)
                  if self.interm_embeddings is not None else None)
        return ImageFeatures(emb, interm)

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (.safetensors) with the signature in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"image_embeddings": self.image_embeddings.contiguous()}
        if self.interm_embeddings is not None:
            tensors["interm_embeddings"] = self.interm_embeddings.contiguous()
        return atomic_write(path, lambda tmp: save_file(
            tensors, tmp, metadata={"signature": json.dumps(self.signature)}))

    @classmethod
    def load(cls, path: str | Path, expected: dict[str, str]) -> "FeatureCache":
        """Read a cache file; raise :class:`FeatureCacheMismatchError` if its signature differs."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise FeatureCacheMismatchError(f"{path}: unreadable embedding cache ({exc})") from exc
        found = json.loads(meta.get("signature", "{}"))
        if found != expected:
            diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise FeatureCacheMismatchError(f"{path}: embedding cache was made for another "
                                         f"{', '.join(diff)}; it will not be reused")
        return cls(tensors["image_embeddings"], tensors.get("interm_embeddings"), found)


@torch.no_grad()
def compute_features(model: SegMoTE, images: np.ndarray, extents: np.ndarray, *,
                     batch_size: int = 8,
                     autocast: bool = False, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None) -> FeatureCache:
    """Run the encoder over (N, 3, S, S) uint8 slices with (N, 2) extents, in batches."""
    was_training = model.training
    model.eval()
    embs, interms = [], []
    n = len(images)
    try:
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            feats = model.encode(model_input(model, images[part], extents[part]),
                                 autocast=autocast)
            embs.append(feats.image_embeddings.to("cpu", torch.float16))
            if feats.interm_embeddings is not None:
                interms.append(feats.interm_embeddings.to("cpu", torch.float16))
            report(progress, min(start + batch_size, n), n, cancel)
    finally:
        model.train(was_training)
    emb = torch.cat(embs)
    interm = torch.cat(interms) if interms else None
    for name, t in (("image", emb), ("intermediate", interm)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} embeddings overflow float16; disable cache_embeddings")
    return FeatureCache(emb, interm, encoder_signature(model, images))


def load_or_compute_features(model: SegMoTE, images: np.ndarray, extents: np.ndarray,
                             path: str | Path | None, *,
                             batch_size: int = 8, autocast: bool = False,
                             progress: ProgressCallback | None = None,
                             cancel: CancelToken | None = None) -> FeatureCache:
    """Reuse the cache at ``path`` when its signature matches, else compute (and save) it."""
    expected = encoder_signature(model, images)
    if path is not None and Path(path).is_file():
        try:
            cache = FeatureCache.load(path, expected)
            log.info("reusing embedding cache %s (%d slices)", path, len(cache))
            return cache
        except FeatureCacheMismatchError as exc:
            log.warning("%s; recomputing", exc)
    cache = compute_features(model, images, extents, batch_size=batch_size, autocast=autocast,
                             progress=progress, cancel=cancel)
    if path is not None:
        cache.save(path)
        log.info("saved embedding cache %s (%d slices)", path, len(cache))
    return cache
