"""Model configuration: one frozen dataclass that travels in every checkpoint and output."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["EncoderPreset", "ENCODER_PRESETS", "SegMoTEConfig", "SIZE_BOUNDS"]


@dataclass(frozen=True)
class EncoderPreset:
    """Sizes of the SAM image encoder and of the decoder width it feeds."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    image_size: int = 1024
    prompt_dim: int = 256  # decoder width C
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256


#: SAM's three official sizes, plus a small CPU model for tests and the bundled demo.
ENCODER_PRESETS: dict[str, EncoderPreset] = {
    "vit_b": EncoderPreset(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": EncoderPreset(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": EncoderPreset(1280, 32, 16, (7, 15, 23, 31)),
    "tiny": EncoderPreset(
        192, 4, 3, (1, 3), patch_size=8, window_size=8, image_size=256,
        prompt_dim=128, decoder_mlp_dim=512, decoder_heads=8, iou_head_hidden_dim=128,
    ),
    # LiteMedSAM (segmote_core.modeling.lite_medsam): TinyViT at 256 px, 64 x 64 embedding;
    # embed_dim is the width of the TinyViT stage that feeds the HQ fusion (stage index 1).
    "lite_medsam": EncoderPreset(160, 4, 0, (1,), patch_size=4, image_size=256),
}


#: bounds of every size field (inclusive): far above any real model, far below what would
#: exhaust memory while building one.
SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    "image_size": (32, 4096), "num_expert_tokens": (0, 64), "num_experts": (1, 64),
    "top_k": (1, 64), "expert_rank": (1, 4096), "num_ppt_queries": (0, 64),
    "ppt_heads": (1, 64),
}
MAX_VOCABULARY = 10000


@dataclass(frozen=True)
class SegMoTEConfig:
    """Everything needed to rebuild a SegMoTE model (docs/model.md).

    Attributes:
        model_type: ``"vit_b" | "vit_l" | "vit_h" | "tiny" | "lite_medsam"``.
        image_size: encoder input side in pixels; ``None`` takes the preset's (1024, tiny 256).
            512 with an official checkpoint interpolates the position tables (docs/model.md).
        num_expert_tokens: T learnable expert tokens; 0 switches expert tokens and MoTE off.
        num_experts: E token experts per decoder block.
        top_k: experts per token (1 as the authors' code, 2 as the paper's figure).
        expert_rank: r, the width of each expert FFN.
        weight_tokens: apply the token weights w = softmax_t(c) to the MoTE update (docs/model.md,
            router step 5).
        hq_fusion: fuse the image embedding and an early ViT block into the expert mask features.
        num_ppt_queries: Q learnable PPT queries; 0 switches PPT off.
        ppt_heads: heads of PPT's multi-head attention.
        vocabulary: category names the text guide knows (PPT training).
        text_encoder: ``"learned"`` (embedding table), ``"minilm"`` (offline sentence encoder,
            frozen, projected) or ``"none"``.
        train_decoder: also train SAM's mask decoder (the paper's fine-tuning setting).
    """

    model_type: str = "vit_b"
    image_size: int | None = None
    num_expert_tokens: int = 4
    num_experts: int = 4
    top_k: int = 1
    expert_rank: int = 64
    weight_tokens: bool = False
    hq_fusion: bool = True
    num_ppt_queries: int = 2
    ppt_heads: int = 8
    vocabulary: tuple[str, ...] = ()
    text_encoder: str = "learned"
    train_decoder: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or self.model_type not in ENCODER_PRESETS:
            raise ValueError(
                f"model_type must be one of {sorted(ENCODER_PRESETS)}, got {self.model_type!r}"
            )
        self._check_bounds()
        size = self.resolved_image_size
        if size % self.preset.patch_size or size <= 0:
            raise ValueError(f"image_size {size} is not a positive multiple of the patch size "
                             f"{self.preset.patch_size}")
        if self.num_expert_tokens < 0 or self.num_ppt_queries < 0:
            raise ValueError("num_expert_tokens and num_ppt_queries must be >= 0")
        if self.num_expert_tokens and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.text_encoder not in ("learned", "minilm", "none"):
            raise ValueError(f"text_encoder must be 'learned', 'minilm' or 'none', "
                             f"got {self.text_encoder!r}")
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))

    def _check_bounds(self) -> None:
        """Every size field within its bounds, before any module is built: a config read from a
        file (``num_experts: 200000``) must not allocate gigabytes before it is refused."""
        for name, (lo, hi) in SIZE_BOUNDS.items():
            value = getattr(self, name)
            if name == "image_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if not isinstance(self.vocabulary, (list, tuple)) or len(self.vocabulary) > MAX_VOCABULARY \
                or not all(isinstance(v, str) and 0 < len(v) <= 200 for v in self.vocabulary):
            raise ValueError(f"vocabulary must be at most {MAX_VOCABULARY} names of 1-200 "
                             f"characters, got {str(self.vocabulary)[:120]}")

    @property
    def preset(self) -> EncoderPreset:
        return ENCODER_PRESETS[self.model_type]

    @property
    def resolved_image_size(self) -> int:
        return self.image_size if self.image_size is not None else self.preset.image_size

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (h = w)."""
        return self.resolved_image_size // self.preset.patch_size

    @property
    def use_experts(self) -> bool:
        return self.num_expert_tokens > 0

    @property
    def use_ppt(self) -> bool:
        return self.num_ppt_queries > 0

    def replace(self, **changes: Any) -> "SegMoTEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vocabulary"] = list(self.vocabulary)
        d["extra"] = dict(self.extra)
        d["image_size"] = self.resolved_image_size
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegMoTEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SegMoTEConfig keys: {sorted(unknown)}")
        d = dict(data)
        if "vocabulary" in d:
            d["vocabulary"] = tuple(d["vocabulary"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
