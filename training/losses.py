"""Segmentation losses and the Dice score (docs/model.md).

``L = w_dice * Dice + w_bce * BCE + w_focal * Focal + w_iou * MSE(IoU head, true IoU)
+ w_balance * L_bal``. Logits are upsampled to the ground truth's resolution before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .train_config import LossConfig

__all__ = ["dice_loss", "focal_loss", "mask_iou", "segmentation_loss", "dice_score",
           "LossTerms", "upsample_logits"]


def upsample_logits(logits: Tensor, size: int | tuple[int, int]) -> Tensor:
    """(B, M, h, w) logits -> (B, M, H, W), bilinear as SAM's postprocessing."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss per item: (B, H, W) logits and {0, 1} targets -> (B,)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return 1.0 - (2.0 * inter + eps) / (p.sum(1) + t.sum(1) + eps)


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss per item (mean over pixels): (B, H, W) -> (B,)."""
    logits, t = logits.float(), target.float()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.flatten(1).mean(1)


def mask_iou(logits: Tensor, target: Tensor) -> Tensor:
    """IoU of the thresholded logits with the target, per item: (B, H, W) -> (B,)."""
    pred = logits > 0
    t = target.bool()
    inter = (pred & t).flatten(1).sum(1).float()
    union = (pred | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclass
class LossTerms:
    """The total loss and its parts for logging: detached 0-d tensors (``float()`` or a
    format spec reads them), so computing them costs no GPU->CPU sync before ``backward``."""

    total: Tensor
    seg: Tensor | float
    dice: Tensor | float
    balance: Tensor | float


def segmentation_loss(logits: Tensor, target: Tensor, weights: LossConfig,
                      iou_pred: Tensor | None = None, balance: Tensor | None = None,
                      per_item: bool = False) -> LossTerms | Tensor:
    """Combined loss for one mask per item.

    Args:
        logits: (B, H, W) mask logits, already at the target's resolution.
        target: (B, H, W) {0, 1}.
        weights: the loss weights.
        iou_pred: (B,) the IoU head's prediction for these masks (``weights.iou`` > 0).
        balance: scalar MoTE load-balance loss (summed over decoder blocks).
        per_item: return the (B,) segmentation loss without balance (for min-over-masks).
    """
    d = dice_loss(logits, target)
    seg = weights.dice * d
    if weights.bce:
        seg = seg + weights.bce * F.binary_cross_entropy_with_logits(
            logits.float(), target.float(), reduction="none").flatten(1).mean(1)
    if weights.focal:
        seg = seg + weights.focal * focal_loss(logits, target)
    if weights.iou and iou_pred is not None:
        seg = seg + weights.iou * (iou_pred.float() - mask_iou(logits, target).detach()) ** 2
    if per_item:
        return seg
    total = seg.mean()
    bal = total.new_zeros(()).detach()
    if balance is not None and weights.balance:
        total = total + weights.balance * balance.float()
        bal = balance.detach().float()
    return LossTerms(total=total, seg=seg.mean().detach(), dice=d.mean().detach(), balance=bal)


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Hard Dice of two boolean arrays; 1.0 when both are empty."""
    pred = np.asarray(pred, bool)
    target = np.asarray(target, bool)
    denom = pred.sum() + target.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, target).sum() / denom)
