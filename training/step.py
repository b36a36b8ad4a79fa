"""One training step's forward pass: prompts -> decoder -> loss (docs/model.md).

Phase ``segmote``: the loss is on the selected expert token's mask (``low_res_masks`` with
M = 1; SAM's mask 0 when expert tokens are off) plus ``balance * L_bal``; with ``sam_aux`` > 0
SAM's own three masks also get the ambiguity-aware loss (min over the three), which keeps
SAM's prompt interface working when its decoder is fine-tuned.

Phase ``sam`` (SAM without expert tokens, trained end to end): box/point prompts get SAM's
ambiguity-aware loss (the smallest of its three masks' losses); a prompt that carries the
category's text token is not ambiguous and trains SAM's single-mask output instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from segmote_core.modeling import DecoderOutput, ImageFeatures, SegMoTE

from .losses import LossTerms, dice_loss, segmentation_loss, upsample_logits
from .prompts import PromptBatch
from .train_config import LossConfig

__all__ = ["StepResult", "decode_batch", "training_loss", "augment_batch"]


@dataclass
class StepResult:
    terms: LossTerms
    output: DecoderOutput


def _tensor(a: np.ndarray | None, device: torch.device, dtype=torch.float32) -> torch.Tensor | None:
    return None if a is None else torch.as_tensor(a, device=device, dtype=dtype)


def decode_batch(model: SegMoTE, feats: ImageFeatures, batch: PromptBatch, *,
                 multimask_output: bool = False, autocast: bool = False) -> DecoderOutput:
    """Decode B images with B prompt sets as drawn by the sampler (incl. PPT guide rounds).

    A ``"mask"``-guided auto step first runs an unguided PPT round without gradients and gives
    its low-res logits as the mask prompt of the second, trained round. In a
    category-conditioned step both rounds carry the category's text token (it is the question,
    not a guide).
    """
    dev = feats.image_embeddings.device
    text = _tensor(batch.text_ids, dev, torch.long)
    ctx = (torch.autocast(dev.type, dtype=torch.bfloat16) if autocast
           else contextlib.nullcontext())
    with ctx:
        if batch.mode == "auto":
            mask_inputs = None
            if batch.guide == "mask":
                with torch.no_grad():
                    first = model.decode(feats, auto=True,
                                         text_ids=text if batch.category else None)
                mask_inputs = first.low_res_masks[:, :1].detach().float()
            return model.decode(feats, auto=True, text_ids=text, mask_inputs=mask_inputs,
                                multimask_output=multimask_output)
        points = None
        if batch.point_coords is not None:
            points = (_tensor(batch.point_coords, dev), _tensor(batch.point_labels, dev, torch.long))
        return model.decode(feats, points=points, boxes=_tensor(batch.boxes, dev),
                            text_ids=text, multimask_output=multimask_output)


def _min_over_masks(logits: torch.Tensor, target: torch.Tensor, weights: LossConfig,
                    iou: torch.Tensor | None) -> torch.Tensor:
    """(B, K, H, W) logits -> (B,) the smallest per-mask loss (SAM's ambiguity-aware loss)."""
    per = torch.stack([
        segmentation_loss(logits[:, k], target, weights,
                          iou_pred=None if iou is None else iou[:, k], per_item=True)
        for k in range(logits.shape[1])], dim=1)
    return per.min(dim=1).values


def training_loss(model: SegMoTE, feats: ImageFeatures, batch: PromptBatch, target: torch.Tensor,
                  weights: LossConfig, *, phase: str = "segmote", sam_aux: float = 0.0,
                  autocast: bool = False) -> StepResult:
    """Forward one batch and compute its loss.

    Args:
        feats: encoder outputs of the B slices (cached, or computed with gradients in phase sam).
        target: (B, S, S) {0, 1} ground truth at the model input.
        phase: ``"segmote"`` or ``"sam"`` (see module docstring).
        sam_aux: weight of SAM's ambiguity-aware loss in phase ``segmote``.
    """
    size = target.shape[-2:]
    if batch.empty is not None:  # a category the slice lacks: the answer is an empty mask
        keep = torch.as_tensor(~batch.empty, device=target.device, dtype=target.dtype)
        target = target * keep.view(-1, *([1] * (target.dim() - 1)))
    multimask = phase == "sam" or sam_aux > 0
    out = decode_batch(model, feats, batch, multimask_output=multimask and batch.mode != "auto",
                       autocast=autocast)
    if phase == "sam":
        if batch.mode == "auto":
            raise ValueError("phase 'sam' trains with box and point prompts only")
        if batch.text_ids is not None:  # the category is named: SAM's single-mask output
            logits = upsample_logits(out.sam_masks[:, :1].float(), size)
            seg = segmentation_loss(logits[:, 0], target, weights, iou_pred=out.sam_iou[:, 0],
                                    per_item=True)
        else:                           # ambiguous: the best of SAM's three masks
            logits = upsample_logits(out.sam_masks[:, 1:].float(), size)
            seg = _min_over_masks(logits, target, weights, out.sam_iou[:, 1:])
        d = dice_loss(logits[:, 0], target)
        return StepResult(LossTerms(total=seg.mean(), seg=seg.mean().detach(),
                                    dice=d.mean().detach(), balance=0.0), out)
    logits = upsample_logits(out.low_res_masks[:, :1].float(), size)[:, 0]
    iou_pred = out.iou_predictions[:, 0] if out.expert_masks is None else None
    terms = segmentation_loss(logits, target, weights, iou_pred=iou_pred,
                              balance=out.balance_loss)
    if sam_aux > 0 and batch.mode != "auto":
        sam_logits = upsample_logits(out.sam_masks[:, 1:].float(), size)
        aux = _min_over_masks(sam_logits, target, weights, out.sam_iou[:, 1:]).mean()
        terms.total = terms.total + sam_aux * aux
    return StepResult(terms, out)


def augment_batch(images: np.ndarray, masks: np.ndarray, batch: PromptBatch,
                  extents: np.ndarray, item_image: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Random left-right flips and intensity jitter on copies (phase ``sam``).

    Args:
        images: (U, 3, S, S) uint8, the batch's distinct slices; extents: (U, 2) their (h, w).
        masks: (B, S, S) bool; item_image: (B,) index of each mask's image in ``images``.
        batch: its boxes / points (B rows) are flipped with their images, in place.
    Returns:
        the augmented images (float32) and masks.
    """
    images = images.astype(np.float32)
    masks = masks.copy()
    flips = rng.random(len(images)) < 0.5
    for u in range(len(images)):
        h, w = (int(v) for v in extents[u])
        if flips[u]:
            images[u, :, :h, :w] = images[u, :, :h, :w][..., ::-1]
        gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-15, 15)
        images[u, :, :h, :w] = np.clip(images[u, :, :h, :w] * gain + offset, 0, 255)
    for b, u in enumerate(item_image):
        if not flips[u]:
            continue
        w = int(extents[u][1])
        masks[b, :, :w] = masks[b, :, :w][:, ::-1]
        if batch.boxes is not None:
            x0, x1 = batch.boxes[b, 0], batch.boxes[b, 2]
            batch.boxes[b, 0], batch.boxes[b, 2] = w - 1 - x1, w - 1 - x0
        if batch.point_coords is not None:
            batch.point_coords[b, :, 0] = w - 1 - batch.point_coords[b, :, 0]
    return images, masks
