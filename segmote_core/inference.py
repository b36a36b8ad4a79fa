"""Many slices at once: the batch path of the pipeline, volumes and evaluation.

Stock SAM's decoder takes one image with N prompts; here B slices are encoded in one call and
decoded with one prompt set each (PPT tokens, or one box per slice) without repeating
embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .modeling import ImageFeatures, SegMoTE
from .predictor import use_bf16
from .progress import CancelToken, ProgressCallback, report
from .transforms import ResizePad, normalize_intensity, to_tensor_image

__all__ = ["BatchResult", "prepare_batch", "encode_batch", "segment_batch"]


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
    rgb = torch.cat([to_tensor_image(normalize_intensity(a, modality, window)) for a in arr])
    resized = ResizePad(model.image_size).apply_image(rgb)
    return model.preprocess(resized.to(model.device)), shape[:2], tuple(resized.shape[-2:])


@torch.inference_mode()
def encode_batch(model: SegMoTE, batch: torch.Tensor, chunk: int = 8,
                 bf16: bool = False) -> ImageFeatures:
    """Encode (B, 3, S, S) in chunks of ``chunk`` slices."""
    parts = [model.encode(batch[i:i + chunk], autocast=bf16) for i in range(0, len(batch), chunk)]
    interm = None
    if parts[0].interm_embeddings is not None:
        interm = torch.cat([p.interm_embeddings for p in parts])
    return ImageFeatures(torch.cat([p.image_embeddings for p in parts]), interm)


@torch.inference_mode()
def segment_batch(model: SegMoTE, slices: Sequence[np.ndarray] | np.ndarray, modality: str = "auto",
                  boxes: np.ndarray | None = None, *, window=None, precision: str = "auto",
                  chunk: int = 8, progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> BatchResult:
    """Segment B slices: PPT auto mode (``boxes=None``) or one XYXY box per slice.

    Args:
        slices: (B, Y, X) or (B, Y, X, 3), or a sequence of same-shaped 2D images.
        boxes: (B, 4) XYXY in original pixels; a row of NaN means "nothing on this slice".
        chunk: slices per encoder/decoder call.
    """
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
        keep = np.ones(m, bool)
        if boxes is None:
            out = model.decode(feats, auto=True)
            sel = np.arange(m)
        else:
            rows = boxes[start:start + m]
            keep = np.isfinite(rows).all(axis=1)
            sel = np.flatnonzero(keep)
            out = None
            if len(sel):
                bt = torch.as_tensor(resize.apply_boxes(rows[sel], original)).to(model.device)
                out = model.decode(_take(feats, sel), boxes=bt)
        chunk_masks = np.zeros((m, *original), bool)
        chunk_conf = np.full(m, np.nan, np.float32)
        chunk_exp = np.full(m, -1, np.int16)
        chunk_tok = np.full(m, -1, np.int16)
        chunk_score = np.full(m, np.nan, np.float32)
        if out is not None:
            up = model.sam.postprocess_masks(out.low_res_masks[:, :1], input_size, original)
            chunk_masks[sel] = (up[:, 0] > 0).cpu().numpy()
            chunk_score[sel] = out.iou_predictions[:, 0].float().cpu().numpy()
            if out.confidence is not None:
                chunk_conf[sel] = out.confidence.float().cpu().numpy()
                chunk_exp[sel] = out.selected_expert.cpu().numpy()
                chunk_tok[sel] = out.selected_token.cpu().numpy()
        masks.append(chunk_masks)
        conf.append(chunk_conf)
        expert.append(chunk_exp)
        token.append(chunk_tok)
        score.append(chunk_score)
        report(progress, min(start + m, n), n, cancel)
    return BatchResult(np.concatenate(masks), np.concatenate(conf), np.concatenate(expert),
                       np.concatenate(token), np.concatenate(score))


def _take(feats: ImageFeatures, idx: np.ndarray) -> ImageFeatures:
    index = torch.as_tensor(idx, device=feats.image_embeddings.device)
    interm = feats.interm_embeddings
    return ImageFeatures(feats.image_embeddings.index_select(0, index),
                         interm.index_select(0, index) if interm is not None else None)
