"""Pre-computed encoder outputs for training with a frozen encoder.

The image encoder is the expensive part of SegMoTE; with it frozen its outputs never change, so
they are computed once per slice and every epoch runs only the decoder side. The cache lives in
memory as float16 tensors and on disk as one ``.safetensors`` file whose metadata signs the
encoder weights, the slice pixels and the image size: a file whose signature differs is refused
(:class:`FeatureCacheMismatchError`) and recomputed, never silently reused. A cache that also
holds the intermediate features is not a mismatch for a model of the same encoder that reads
none (no expert tokens): it serves that model as it is, so runs sharing a cache never overwrite it.

Computing it is the dominant cost of a run on CPU (seconds per slice for a ViT-B), so it is
written in chunks of ``chunk_size`` slices to ``<cache>.parts/`` as it goes: an interrupted
pre-compute resumes at the first missing chunk, and only when all are there is the single
cache file assembled and the parts folder removed.

(The core's per-volume zarr cache serves the predictor; training needs random access to
all slices of a dataset at once, so it keeps this flat tensor form.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from segmote_core.errors import FeatureCacheMismatchError
from segmote_core.fileio import atomic_write
from segmote_core.modeling import ImageFeatures, SegMoTE
from segmote_core.progress import CancelToken, ProgressCallback, report

from .dataset import model_input

__all__ = ["FeatureCacheMismatchError", "FeatureCache", "encoder_signature", "compute_features",
           "load_or_compute_features", "parts_dir", "CHUNK_SIZE"]

log = logging.getLogger(__name__)

#: Slices per chunk file: a few minutes of ViT-B encoding on CPU, lost at most on an interrupt.
CHUNK_SIZE = 32


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


def _serves_without_interm(found: dict[str, str], expected: dict[str, str]) -> bool:
    """A cache with intermediate features (``found``) holds all a model that needs none
    (``expected``) reads: the same signature but for ``interm``."""
    return (expected.get("interm") == "False" and found.get("interm") == "True"
            and {**found, "interm": "False"} == expected)


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
        return ImageFeatures(_to(self.image_embeddings[idx], device),
                             _to(self.interm_embeddings[idx], device)
                             if self.interm_embeddings is not None else None)

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
        """Read a cache file; raise :class:`FeatureCacheMismatchError` if its signature differs.

        The signature is checked before any tensor is read, and only the tensors served are read
        (a model without the HQ fusion branch gets no intermediate features)."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                found = json.loads((f.metadata() or {}).get("signature", "{}"))
                served = found == expected or _serves_without_interm(found, expected)
                names = ["image_embeddings"]
                if found == expected and "interm_embeddings" in f.keys():
                    names.append("interm_embeddings")
                tensors = {name: f.get_tensor(name) for name in names} if served else {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise FeatureCacheMismatchError(f"{path}: unreadable embedding cache ({exc})") from exc
        if not served:
            diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise FeatureCacheMismatchError(f"{path}: embedding cache was made for another "
                                         f"{', '.join(diff)}; it will not be reused")
        return cls(tensors["image_embeddings"], tensors.get("interm_embeddings"), dict(expected))


@torch.no_grad()
def compute_features(model: SegMoTE, images: np.ndarray, extents: np.ndarray, *,
                     batch_size: int = 8,
                     autocast: bool = False, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None,
                     signature: dict[str, str] | None = None, done: int = 0,
                     total: int | None = None) -> FeatureCache:
    """Run the encoder over (N, 3, S, S) uint8 slices with (N, 2) extents, in batches.

    ``progress(done + computed, total)`` after each batch (``done``/``total``: slices already
    computed elsewhere and the whole count, when this is one chunk of a larger set).
    """
    was_training = model.training
    model.eval()
    embs, interms = [], []
    n = len(images)
    total = n if total is None else total
    try:
        for start in range(0, n, batch_size):
            if cancel is not None:  # checked before a batch: a finished chunk is always saved
                cancel.raise_if_cancelled()
            part = slice(start, start + batch_size)
            feats = model.encode(model_input(model, images[part], extents[part]),
                                 autocast=autocast)
            embs.append(feats.image_embeddings.to("cpu", torch.float16))
            if feats.interm_embeddings is not None:
                interms.append(feats.interm_embeddings.to("cpu", torch.float16))
            report(progress, done + min(start + batch_size, n), total)
    finally:
        model.train(was_training)
    emb = torch.cat(embs)
    interm = torch.cat(interms) if interms else None
    for name, t in (("image", emb), ("intermediate", interm)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} embeddings overflow float16; disable cache_embeddings")
    return FeatureCache(emb, interm, signature or encoder_signature(model, images))


def parts_dir(path: str | Path) -> Path:
    """The folder of chunk files of the cache at ``path`` while it is being computed."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _chunk_path(parts: Path, start: int, stop: int) -> Path:
    return parts / f"chunk_{start:07d}_{stop:07d}.safetensors"


def _open_parts(parts: Path, expected: dict[str, str]) -> None:
    """Make ``parts`` hold chunks of ``expected`` only: chunks of another encoder or image set
    (a changed config or cohort) are removed, never mixed in."""
    sig_file = parts / "signature.json"
    if parts.is_dir():
        try:
            found = json.loads(sig_file.read_text())
        except (OSError, ValueError):
            found = None
        if found == expected:
            return
        log.warning("%s: partial embedding cache of another encoder or image set; starting "
                    "it over", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    atomic_write(sig_file, lambda tmp: Path(tmp).write_text(json.dumps(expected)))


def _compute_in_chunks(model: SegMoTE, images: np.ndarray, extents: np.ndarray, path: Path,
                       expected: dict[str, str], *, batch_size: int, chunk_size: int,
                       autocast: bool, progress: ProgressCallback | None,
                       cancel: CancelToken | None) -> FeatureCache:
    parts = parts_dir(path)
    _open_parts(parts, expected)
    n = len(images)
    bounds = [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]
    chunks: dict[int, FeatureCache] = {}
    for a, b in bounds:
        cp = _chunk_path(parts, a, b)
        if cp.is_file():
            try:
                chunks[a] = FeatureCache.load(cp, {**expected, "chunk": f"{a}:{b}"})
            except FeatureCacheMismatchError as exc:
                log.warning("%s; recomputing that chunk", exc)
    done = sum(len(c) for c in chunks.values())
    if done:
        log.info("resuming the embedding pre-compute: %d of %d slices already in %s", done,
                 n, parts)
    report(progress, done, n, cancel)
    for a, b in bounds:
        if a in chunks:
            continue
        chunk = compute_features(model, images[a:b], extents[a:b], batch_size=batch_size,
                                 autocast=autocast, progress=progress, cancel=cancel,
                                 signature={**expected, "chunk": f"{a}:{b}"}, done=done,
                                 total=n)
        chunk.save(_chunk_path(parts, a, b))
        chunks[a] = chunk
        done += len(chunk)
    ordered = [chunks[a] for a, _ in bounds]
    interm = (torch.cat([c.interm_embeddings for c in ordered])
              if ordered[0].interm_embeddings is not None else None)
    cache = FeatureCache(torch.cat([c.image_embeddings for c in ordered]), interm, expected)
    cache.save(path)
    shutil.rmtree(parts)      # only after the whole file is in place
    return cache


def load_or_compute_features(model: SegMoTE, images: np.ndarray, extents: np.ndarray,
                             path: str | Path | None, *,
                             batch_size: int = 8, chunk_size: int | None = None,
                             autocast: bool = False,
                             progress: ProgressCallback | None = None,
                             cancel: CancelToken | None = None) -> FeatureCache:
    """Reuse the cache at ``path`` when its signature matches, else compute (and save) it,
    chunk by chunk, resuming from the chunks an interrupted run left in :func:`parts_dir`."""
    expected = encoder_signature(model, images)
    if path is not None and Path(path).is_file():
        try:
            cache = FeatureCache.load(path, expected)
            log.info("reusing embedding cache %s (%d slices)", path, len(cache))
            return cache
        except FeatureCacheMismatchError as exc:
            log.warning("%s; recomputing", exc)
    if path is None:
        return compute_features(model, images, extents, batch_size=batch_size,
                                autocast=autocast, progress=progress, cancel=cancel,
                                signature=expected)
    cache = _compute_in_chunks(model, images, extents, Path(path), expected,
                               batch_size=batch_size,
                               chunk_size=max(1, chunk_size or CHUNK_SIZE),
                               autocast=autocast, progress=progress, cancel=cancel)
    log.info("saved embedding cache %s (%d slices)", path, len(cache))
    return cache


def _to(gathered: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A gathered (fresh) CPU tensor -> float32 on ``device``: on CUDA through pinned memory,
    asynchronously, in its stored dtype (a bf16 cache crosses the bus at half the bytes)."""
    if torch.device(device).type != "cuda":
        return gathered.to(device=device, dtype=torch.float32)
    return gathered.pin_memory().to(device, non_blocking=True).float()
