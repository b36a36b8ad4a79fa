"""Many slices at once: the batch path of the pipeline, volumes and evaluation.

Stock SAM's decoder takes one image with N prompts; here B slices are encoded in one call and
decoded with one prompt set each (PPT tokens, or one box per slice) without repeating
embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .modeling import ImageFeatures, SegMoTE
from .predictor import use_bf16
from .progress import CancelToken, ProgressCallback, report
from .transforms import ResizePad, normalize_to_tensor

__all__ = ["BatchResult", "prepare_batch", "encode_batch", "embed_slices", "stack_embeddings",
           "decode_auto", "segment_batch"]


@dataclass
class BatchResult:
    masks: np.ndarray        # (B, Y, X) bool
    confidence: np.ndarray   # (B,) float32 router confidence (NaN: no object / no experts)
    expert: np.ndarray       # (B,) int16, -1 when none
    token: np.ndarray        # (B,) int16, -1 when none
    score: np.ndarray        # (B,) float32 mask quality (stability / IoU head)


def prepare_batch(model: SegMoTE, slices: Sequence[np.ndarray] | np.ndarray, modality: str = "auto",
                  window=None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Normalise, resize and pad B same-shaped slices -> (B, 3, S, S), original, input size."""
    arr = [np.asarray(s) for s in slices]
    if not arr:
        raise ValueError("no slices given")
    shape = arr[0].shape
    if any(a.shape != shape for a in arr):
        raise ValueError(f"slices of one batch must share a shape, got {sorted({a.shape for a in arr})}")
    # on the model's device: raw slices cross in their own dtype (pinned, asynchronous on
    # CUDA, so the copy of one slice overlaps the normalisation of the previous one)
    rgb = torch.cat([normalize_to_tensor(a, modality, window, device=model.device) for a in arr])
    resized = ResizePad(model.image_size).apply_image(rgb)
    return model.preprocess(resized), shape[:2], tuple(resized.shape[-2:])


@torch.inference_mode()
def encode_batch(model: SegMoTE, batch: torch.Tensor, chunk: int = 8,
                 bf16: bool = False) -> ImageFeatures:
    """Encode (B, 3, S, S) in chunks of ``chunk`` slices."""
    parts = [model.encode(batch[i:i + chunk], autocast=bf16) for i in range(0, len(batch), chunk)]
    interm = None
    if parts[0].interm_embeddings is not None:
        interm = torch.cat([p.interm_embeddings for p in parts])
    return ImageFeatures(torch.cat([p.image_embeddings for p in parts]), interm)


def embed_slices(model: SegMoTE, get_slice: Callable[[int], np.ndarray], zs: Sequence[int],
                 modality: str = "auto", window=None, *, bf16: bool = False, batch: int = 4
                 ) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """Encode slices ``zs`` ``batch`` at a time; yield each batch as ``(z, embedding)`` pairs.

    An embedding is the dict of :meth:`SegMoTEPredictor.get_embedding` (float32 numpy arrays
    and the original / input sizes): the same normalisation, resize and encoder precision as
    ``set_image``, so it can be cached and restored with ``set_embedding``. Only one batch of
    slices is in memory at a time; a caller that stops iterating stops the work.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    zs = [int(z) for z in zs]
    for start in range(0, len(zs), batch):
        part = zs[start:start + batch]
        x, original, input_size = prepare_batch(model, [get_slice(z) for z in part], modality,
                                                window)
        feats = encode_batch(model, x, chunk=batch, bf16=bf16)
        emb = feats.image_embeddings.float().cpu().numpy()
        interm = (feats.interm_embeddings.float().cpu().numpy()
                  if feats.interm_embeddings is not None else None)
        out = []
        for i, z in enumerate(part):
            entry: dict[str, Any] = {"image_embeddings": emb[i], "original_size": original,
                                     "input_size": input_size}
            if interm is not None:
                entry["interm_embeddings"] = interm[i]
            out.append((z, entry))
        yield out


def stack_embeddings(model: SegMoTE, embeddings: Sequence[dict[str, Any]]
                     ) -> tuple[ImageFeatures, tuple[int, int], tuple[int, int]]:
    """Embedding dicts of same-sized slices -> batched features, original and input size."""
    sizes = {(tuple(e["original_size"]), tuple(e["input_size"])) for e in embeddings}
    if len(sizes) != 1:
        raise ValueError(f"embeddings of one batch must share their sizes, got {sorted(sizes)}")
    (original, input_size), = sizes
    emb = torch.as_tensor(np.stack([np.asarray(e["image_embeddings"]) for e in embeddings]),
                          dtype=torch.float32)
    interm = None
    if model.needs_interm:
        interm = torch.as_tensor(np.stack([np.asarray(e["interm_embeddings"])
                                           for e in embeddings]), dtype=torch.float32)
    feats = ImageFeatures(emb, interm).to(model.device)
    return feats, tuple(int(v) for v in original), tuple(int(v) for v in input_size)


@torch.inference_mode()
def decode_auto(model: SegMoTE, feats: ImageFeatures, original: tuple[int, int],
                input_size: tuple[int, int], text: str | None = None) -> BatchResult:
    """PPT (prompt-free) masks of B already-encoded slices; ``text``: a category of the
    model's vocabulary whose text token rides with the PPT tokens (category-conditioned PPT,
    docs/model.md)."""
    from .categories import text_ids_for

    m = int(feats.image_embeddings.shape[0])
    out = model.decode(feats, auto=True, text_ids=text_ids_for(model, text, m))
    return _decoded(model, out, np.arange(m), m, original, input_size)


def _decoded(model: SegMoTE, out: Any, sel: np.ndarray, m: int, original: tuple[int, int],
             input_size: tuple[int, int]) -> BatchResult:
    """A decoder output for slices ``sel`` of ``m`` -> a BatchResult (the others empty)."""
    masks = np.zeros((m, *original), bool)
    conf = np.full(m, np.nan, np.float32)
    expert = np.full(m, -1, np.int16)
    token = np.full(m, -1, np.int16)
    score = np.full(m, np.nan, np.float32)
    if out is not None:
        finite = torch.isfinite(out.low_res_masks[:, :1]).flatten(1).all(dim=1)
        if not bool(finite.all()):
            # NaN/inf weights or an overflow: such logits threshold to an empty mask that
            # would pass for "nothing here"; refuse them instead.
            bad = [int(sel[i]) for i in torch.nonzero(~finite).flatten().tolist()]
            raise FloatingPointError(
                f"the model produced non-finite mask logits (NaN/inf) on {len(bad)} of {m} "
                f"slice(s) (batch positions {bad[:8]}): its weights or this input overflow; "
                f"check the checkpoint")
        up = model.sam.postprocess_masks(out.low_res_masks[:, :1], input_size, original)
        masks[sel] = (up[:, 0] > 0).cpu().numpy()
        score[sel] = out.iou_predictions[:, 0].float().cpu().numpy()
        if out.confidence is not None:
            conf[sel] = out.confidence.float().cpu().numpy()
            expert[sel] = out.selected_expert.cpu().numpy()
            token[sel] = out.selected_token.cpu().numpy()
    return BatchResult(masks, conf, expert, token, score)


@torch.inference_mode()
def segment_batch(model: SegMoTE, slices: Sequence[np.ndarray] | np.ndarray, modality: str = "auto",
                  boxes: np.ndarray | None = None, *, window=None, precision: str = "auto",
                  chunk: int = 8, progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None, text: str | None = None) -> BatchResult:
    """Segment B slices: PPT auto mode (``boxes=None``) or one XYXY box per slice.

    Args:
        slices: (B, Y, X) or (B, Y, X, 3), or a sequence of same-shaped 2D images.
        boxes: (B, 4) XYXY in original pixels; a row of NaN means "nothing on this slice".
        chunk: slices per encoder/decoder call.
        text: PPT for this category of the model's vocabulary (its text token beside the PPT
            tokens; auto mode only).
    """
    from .categories import text_ids_for

    if text is not None and boxes is not None:
        raise ValueError("text names the category PPT segments: it goes with auto mode only")
    bf16 = use_bf16(model, precision)
    n = len(slices)
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(n, 4)
    resize = ResizePad(model.image_size)
    masks, conf, expert, token, score = [], [], [], [], []
    for start in range(0, n, chunk):
        part = slices[start:start + chunk]
        batch, original, input_size = prepare_batch(model, part, modality, window)
        feats = encode_batch(model, batch, chunk, bf16)
        m = len(part)
        if boxes is None:
            out = model.decode(feats, auto=True, text_ids=text_ids_for(model, text, m))
            sel = np.arange(m)
        else:
            rows = boxes[start:start + m]
            keep = np.isfinite(rows).all(axis=1)
            sel = np.flatnonzero(keep)
            out = None
            if len(sel):
                bt = torch.as_tensor(resize.apply_boxes(rows[sel], original)).to(model.device)
                out = model.decode(_take(feats, sel), boxes=bt)
        res = _decoded(model, out, sel, m, original, input_size)
        masks.append(res.masks)
        conf.append(res.confidence)
        expert.append(res.expert)
        token.append(res.token)
        score.append(res.score)
        report(progress, min(start + m, n), n, cancel)
    return BatchResult(np.concatenate(masks), np.concatenate(conf), np.concatenate(expert),
                       np.concatenate(token), np.concatenate(score))


def _take(feats: ImageFeatures, idx: np.ndarray) -> ImageFeatures:
    index = torch.as_tensor(idx, device=feats.image_embeddings.device)
    interm = feats.interm_embeddings
    return ImageFeatures(feats.image_embeddings.index_select(0, index),
                         interm.index_select(0, index) if interm is not None else None)
