"""Model builders and loaders: SAM's own modules for vit_b/l/h and ``tiny`` plus SegMoTE's
additions, and the models that checkpoints describe (:func:`load_segmote`). Reading and
writing checkpoint files is :mod:`segmote_core.checkpoint`'s job; this module imports it, never
the other way round."""

from __future__ import annotations

import logging
from functools import partial
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import Tensor

from .checkpoint import (CheckpointError, checkpoint_state, load_sam_state_dict,
                         load_state_strict, read_checkpoint_info)
from .config import SegMoTEConfig
from .modeling import SegMoTE

__all__ = ["build_sam", "build_segmote", "load_segmote", "load_model", "load_demo_model",
           "demo_model_path",
           "interpolate_position_tables"]

log = logging.getLogger(__name__)

DEMO_MODEL = "segmote_demo.safetensors"


def build_sam(config: SegMoTEConfig) -> Sam:
    """A randomly initialised SAM of ``config``'s size, built from SAM's own classes."""
    p = config.preset
    size = config.resolved_image_size
    emb = size // p.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=p.depth, embed_dim=p.embed_dim, img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=p.num_heads,
            patch_size=p.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=p.global_attn_indexes, window_size=p.window_size,
            out_chans=p.prompt_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=p.prompt_dim, image_embedding_size=(emb, emb),
            input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=p.prompt_dim,
                                          mlp_dim=p.decoder_mlp_dim, num_heads=p.decoder_heads),
            transformer_dim=p.prompt_dim, iou_head_depth=3,
            iou_head_hidden_dim=p.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def interpolate_position_tables(state: dict[str, Tensor], sam: Sam) -> dict[str, Tensor]:
    """Resize the encoder's absolute and relative position tables to ``sam``'s input size.

    An official checkpoint is trained at 1024 px (64 x 64 tokens); at 512 px the absolute table
    is resized bicubically to 32 x 32 and the global-attention blocks' relative tables
    (2 * 64 - 1 rows) linearly to 2 * 32 - 1 rows (docs/model.md). Windowed blocks keep theirs.
    """
    target = sam.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key].shape
        if key.endswith("image_encoder.pos_embed"):
            grid = value.permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=want[1:3], mode="bicubic", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype)
        elif key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")):
            table = value.float().t().unsqueeze(0)  # (1, head_dim, L)
            table = F.interpolate(table, size=want[0], mode="linear", align_corners=False)
            out[key] = table[0].t().to(value.dtype)
        else:
            continue
        log.info("interpolated %s from %s to %s", key, tuple(value.shape), tuple(want))
    return out


def build_segmote(config: SegMoTEConfig | None = None, *, sam_checkpoint: str | Path | None = None,
                  device: str | torch.device = "cpu", compute_text_vectors: bool = True) -> SegMoTE:
    """Build SegMoTE; with ``sam_checkpoint`` SAM's weights come from an official ``.pth``.

    The added modules start from their initialisation (the router's gate at zero, as the
    authors'); load trained SegMoTE weights with :func:`load_segmote`.
    """
    config = config or SegMoTEConfig()
    sam = build_sam(config)
    if sam_checkpoint is not None:
        state = load_sam_state_dict(sam_checkpoint)
        state = interpolate_position_tables(state, sam)
        load_state_strict(sam, state, str(sam_checkpoint))
    model = SegMoTE(sam, config, compute_text_vectors).to(device)
    model.eval()
    return model


def load_segmote(path: str | Path, *, sam_checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu") -> SegMoTE:
    """Rebuild the model a SegMoTE checkpoint describes and load its weights (strict keys)."""
    path = Path(path)
    info = read_checkpoint_info(path)
    config = SegMoTEConfig.from_dict(info["config"])
    base = info["base"]["kind"]
    if base == "sam_checkpoint" and sam_checkpoint is None:
        raise CheckpointError(
            f"{path}: these SegMoTE weights sit on the official SAM {config.model_type} "
            f"checkpoint; pass sam_checkpoint= (--sam-checkpoint) with its path")
    model = build_segmote(config, sam_checkpoint=sam_checkpoint if base != "embedded" else None,
                          compute_text_vectors=False)  # the vectors come from the file
    state = checkpoint_state(path, info, model.state_dict())
    load_state_strict(model, state, str(path))
    model.apply_freezing()
    return model.to(device).eval()


def demo_model_path() -> Path:
    """Path of the bundled demo model (``segmote_core/data/demo``)."""
    return Path(str(resources.files("segmote_core") / "data" / "demo" / DEMO_MODEL))


def load_demo_model(device: str | torch.device = "cpu") -> SegMoTE:
    """The bundled tiny demo model (trained by ``training/``), in eval mode."""
    path = demo_model_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled demo model is missing at {path}; reinstall segmote or pass "
            f"--sam-checkpoint/--segmote-checkpoint")
    return load_segmote(path, device=device)


def load_model(segmote_checkpoint: str | Path | None = None,
               sam_checkpoint: str | Path | None = None, *, model_type: str = "vit_b",
               device: str | torch.device = "cpu") -> SegMoTE:
    """The model users ask for: SegMoTE weights (+ their SAM base), bare SAM, or the demo."""
    if segmote_checkpoint is not None:
        return load_segmote(segmote_checkpoint, sam_checkpoint=sam_checkpoint, device=device)
    if sam_checkpoint is not None:
        log.warning("no SegMoTE weights given: expert tokens and PPT are untrained")
        return build_segmote(SegMoTEConfig(model_type=model_type), sam_checkpoint=sam_checkpoint,
                             device=device)
    return load_demo_model(device=device)
