"""The free-box steps' teacher (docs/model.md, "Free boxes"): the frozen base SAM, whose mask
for a box anywhere on the body is the target of a free-box step."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from segmote_core.build import build_segmote
from segmote_core.modeling import ImageFeatures, SegMoTE

from .losses import upsample_logits

__all__ = ["build_teacher", "teacher_masks"]


def build_teacher(model: SegMoTE, sam_checkpoint: str | Path | None,
                  device: torch.device | str = "cpu") -> SegMoTE:
    """A frozen base SAM (additions off: SegMoTE then equals it exactly).

    The pretrained base's own weights (LiteMedSAM's, a ``sam_checkpoint``'s), also when an
    ``init_checkpoint`` seeded ``model`` with a trained decoder; for a from-scratch base, whose
    SAM comes from the init checkpoint, ``model``'s SAM as loaded (call before training).
    """
    base = model.config.replace(num_expert_tokens=0, num_ppt_queries=0, hq_fusion=False,
                                vocabulary=(), train_decoder=False)
    if sam_checkpoint is not None or base.model_type == "lite_medsam":
        sam = build_segmote(base, sam_checkpoint=sam_checkpoint).sam
    else:
        sam = copy.deepcopy(model.sam)
    teacher = SegMoTE(sam, base, compute_text_vectors=False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


@torch.no_grad()
def teacher_masks(teacher: SegMoTE, feats: ImageFeatures, boxes: np.ndarray,
                  extents: np.ndarray, size: int) -> torch.Tensor:
    """(B, size, size) bool: the teacher's masks for B boxes on B embeddings, cut to each
    image's (h, w) extent (zero in the padding)."""
    dev = feats.image_embeddings.device
    low = teacher.decode(ImageFeatures(feats.image_embeddings, None),
                         boxes=torch.as_tensor(boxes, device=dev, dtype=torch.float32)
                         ).low_res_masks[:, :1].float()
    masks = upsample_logits(low, (size, size))[:, 0] > 0
    for b, (h, w) in enumerate(np.asarray(extents)):
        masks[b, int(h):] = False
        masks[b, :, int(w):] = False
    return masks
