"""The SegMoTE model: a stock SAM (``self.sam``) composed with the added modules.

Parameters under ``sam.`` are SAM's own, with SAM's own keys (official checkpoints load into
``model.sam`` unchanged); everything else is SegMoTE's addition.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from ..config import SegMoTEConfig
from . import lite_medsam
from .mask_decoder import SegMoTEMaskDecoder
from .ppt import PromptTokenizer, build_text_encoder

__all__ = ["SegMoTE", "ImageFeatures", "DecoderOutput", "stability_score"]


@dataclass
class ImageFeatures:
    """Encoder outputs for B images."""

    image_embeddings: Tensor            # (B, C, h, w)
    interm_embeddings: Tensor | None    # (B, h, w, D_vit) first global-attention block, or None
    hq: Tensor | None = None            # (B, C/8, 4h, 4w) fusion features, cached at inference

    def __getitem__(self, idx: slice | int) -> "ImageFeatures":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        def take(t: Tensor | None) -> Tensor | None:
            return t[idx] if t is not None else None
        return ImageFeatures(self.image_embeddings[idx], take(self.interm_embeddings),
                             take(self.hq))

    def to(self, *args, **kwargs) -> "ImageFeatures":
        def move(t: Tensor | None) -> Tensor | None:
            return t.to(*args, **kwargs) if t is not None else None
        return ImageFeatures(move(self.image_embeddings), move(self.interm_embeddings),
                             move(self.hq))


@dataclass
class DecoderOutput:
    """Decoder results for N prompt sets (shapes in docs/ARCHITECTURE.md)."""

    low_res_masks: Tensor            # (N, M, 4h, 4w) logits
    iou_predictions: Tensor          # (N, M) IoU head (SAM masks) / stability (expert mask)
    expert_masks: Tensor | None      # (N, 1, 4h, 4w)
    sam_masks: Tensor                # (N, 4, 4h, 4w) every SAM mask token's logits
    sam_iou: Tensor                  # (N, 4)
    selected_token: Tensor | None    # (N,)
    selected_expert: Tensor | None   # (N,)
    confidence: Tensor | None        # (N,) router probability of (t*, e*) in [0, 1]
    token_weights: Tensor | None     # (N, T)
    balance_loss: Tensor             # () summed over blocks
    routings: list                   # RoutingResult per block
    heatmaps: Tensor | None = None   # (N, E, h, w) routing heat maps, when asked


def stability_score(logits: Tensor, threshold: float = 0.0, offset: float = 1.0) -> Tensor:
    """SAM's stability score: IoU of the masks thresholded at ``threshold -/+ offset``."""
    hi = (logits > threshold + offset).flatten(-2).sum(-1, dtype=torch.float32)
    lo = (logits > threshold - offset).flatten(-2).sum(-1, dtype=torch.float32)
    return torch.where(lo > 0, hi / lo.clamp_min(1), torch.ones_like(lo))


class SegMoTE(nn.Module):
    """SAM + expert tokens / MoTE + PPT (docs/model.md)."""

    def __init__(self, sam: Sam, config: SegMoTEConfig, compute_text_vectors: bool = True) -> None:
        super().__init__()
        self.sam = sam
        self.config = config
        # which additions were trained (segmote_core.trained): set by whoever loads the model
        # from a file; None for a model built in code (to be trained), which is never refused
        self.trained_parts: frozenset[str] | None = None
        dim = config.preset.prompt_dim
        self.expert_decoder = SegMoTEMaskDecoder(
            dim=dim, depth=len(sam.mask_decoder.transformer.layers),
            vit_dim=config.preset.embed_dim, num_expert_tokens=config.num_expert_tokens,
            num_experts=config.num_experts, top_k=config.top_k, rank=config.expert_rank,
            weight_tokens=config.weight_tokens, hq_fusion=config.hq_fusion)
        self.ppt = (PromptTokenizer(dim=dim, num_queries=config.num_ppt_queries,
                                    num_heads=config.ppt_heads) if config.use_ppt else None)
        self.text_encoder = (build_text_encoder(config.text_encoder, config.vocabulary, dim,
                                                compute_text_vectors)
                             if config.vocabulary else None)
        self.interm_block = config.preset.global_attn_indexes[0]
        self._dense_pe: tuple[tuple, Tensor] | None = None
        self.apply_freezing()

    # ----------------------------------------------------------------------------- setup
    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def is_lite_medsam(self) -> bool:
        return self.config.model_type == lite_medsam.MODEL_TYPE

    @property
    def needs_interm(self) -> bool:
        return self.expert_decoder.hq_fusion

    def apply_freezing(self) -> None:
        """Encoder and prompt encoder frozen; SAM's decoder frozen unless ``train_decoder``."""
        for p in self.sam.image_encoder.parameters():
            p.requires_grad_(False)
        for p in self.sam.prompt_encoder.parameters():
            p.requires_grad_(False)
        for p in self.sam.mask_decoder.parameters():
            p.requires_grad_(self.config.train_decoder)
        for name, p in self.named_parameters():
            if not name.startswith("sam."):
                p.requires_grad_(True)

    def added_state_dict(self) -> dict[str, Tensor]:
        """SegMoTE's own tensors (everything outside ``sam.``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("sam.")}

    # ----------------------------------------------------------------------------- encoder
    @contextlib.contextmanager
    def _capture_interm(self) -> Iterator[dict]:
        store: dict = {}
        if not self.needs_interm:
            yield store
            return
        if self.is_lite_medsam:  # a TinyViT stage gives (B, N, C) tokens
            block = lite_medsam.interm_module(self.sam.image_encoder)
            hook = lambda m, i, o: store.__setitem__("x", lite_medsam.interm_to_grid(o))  # noqa: E731
        else:
            block = self.sam.image_encoder.blocks[self.interm_block]
            hook = lambda m, i, o: store.__setitem__("x", o)  # noqa: E731
        handle = block.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float pixels in [0, 255], H, W <= image_size -> normalised, padded.

        LiteMedSAM takes its own input (min-max to [0, 1] per image, zero padding).
        """
        if self.is_lite_medsam:
            return lite_medsam.preprocess_lite(images, self.image_size)
        images = (images - self.sam.pixel_mean) / self.sam.pixel_std
        pad_h = self.image_size - images.shape[-2]
        pad_w = self.image_size - images.shape[-1]
        if pad_h < 0 or pad_w < 0:
            raise ValueError(f"image of {tuple(images.shape[-2:])} exceeds the encoder's "
                             f"{self.image_size}; resize it first (segmote_core.transforms)")
        return F.pad(images, (0, pad_w, 0, pad_h))

    def encode(self, images: Tensor, autocast: bool = False) -> ImageFeatures:
        """Run the (frozen) image encoder on (B, 3, S, S) preprocessed images.

        ``autocast`` runs it under bf16 autocast on the model's device type; outputs come back
        as float32.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.image_size:
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(images.shape)}")
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if autocast
               else contextlib.nullcontext())
        with self._capture_interm() as store, ctx:
            emb = self.sam.image_encoder(images)
        interm = store.get("x")
        return ImageFeatures(emb.float(), interm.float() if interm is not None else None)

    @torch.inference_mode()
    def cache_hq(self, features: ImageFeatures) -> ImageFeatures:
        """Compute the per-image fusion features once, for repeated prompting at inference."""
        if self.needs_interm and features.hq is None:
            features.hq = self.expert_decoder.hq_features(features.image_embeddings,
                                                       features.interm_embeddings)
        return features

    # ----------------------------------------------------------------------------- decoder
    def dense_pe(self) -> Tensor:
        """SAM's dense positional encoding (1, C, h, w), kept between prompts at inference.

        It depends only on the prompt encoder's random-feature matrix, yet SAM recomputes it
        (sin/cos over the whole grid) for every prompt; the cache is keyed on that buffer's
        identity and version counter, so a new or edited matrix recomputes it.

        Always float32, autocast or not: sin/cos of coordinates x 2 pi x a Gaussian matrix
        lose up to ~0.1 in bf16 over a 64 x 64 grid, and a bf16 copy in the cache would then
        serve a later fp32 decode too. The cache key holds the result's dtype all the same.
        """
        pe = self.sam.prompt_encoder
        matrix = pe.pe_layer.positional_encoding_gaussian_matrix
        if torch.is_grad_enabled():
            return self._dense_pe_fp32(matrix.device.type)
        key = (matrix.data_ptr(), matrix._version, matrix.device, matrix.dtype, torch.float32)
        if self._dense_pe is None or self._dense_pe[0] != key:
            self._dense_pe = (key, self._dense_pe_fp32(matrix.device.type))
        return self._dense_pe[1]

    def _dense_pe_fp32(self, device_type: str) -> Tensor:
        with torch.autocast(device_type, enabled=False):
            return self.sam.prompt_encoder.get_dense_pe().float()

    def decode(
        self,
        features: ImageFeatures,
        *,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        mask_inputs: Tensor | None = None,
        auto: bool = False,
        text_ids: Tensor | None = None,
        multimask_output: bool = False,
        want_heatmaps: bool = False,
        fusion_bf16: bool = False,
    ) -> DecoderOutput:
        """Decode masks for prompts given in the encoder's input frame (pixels of S x S).

        Args:
            features: from :meth:`encode`, batch 1 (N prompt sets on one image) or N.
            points: coords (N, P, 2) XY and labels (N, P) (1 fg, 0 bg, -1 pad).
            boxes: (N, 4) XYXY.
            mask_inputs: (N, 1, 4h, 4w) low-res logits of a previous round.
            auto: PPT tokens replace the sparse prompt (prompt-free segmentation).
            text_ids: (N,) vocabulary indices: a text token beside the prompt (PPT training).
            multimask_output: return SAM's three ambiguity masks (M = 3) instead of one.
            want_heatmaps: compute routing heat maps (docs/model.md, router step 8).
            fusion_bf16: per-prompt fusion convs under bf16 autocast (inference speed).
        """
        if auto and (points is not None or boxes is not None):
            raise ValueError("auto=True (PPT) replaces point and box prompts: give neither")
        if auto and not self.training:
            from ..trained import UntrainedModelError, auto_unavailable

            reason = auto_unavailable(self)
            if reason:  # random PPT queries would segment noise and report it done
                raise UntrainedModelError(reason)
        if auto and self.ppt is None:
            raise ValueError("this model has no PPT module (num_ppt_queries=0): auto is unavailable")
        emb = features.image_embeddings
        pe = self.sam.prompt_encoder
        if auto:
            n = emb.shape[0] if mask_inputs is None else mask_inputs.shape[0]
            dense = (pe.mask_downscaling(mask_inputs) if mask_inputs is not None else
                     pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                         n, -1, *pe.image_embedding_size))
            ppt_emb = emb if emb.shape[0] == n else emb.expand(n, -1, -1, -1)
            sparse = self.ppt(ppt_emb)
        else:
            sparse, dense = pe(points=points, boxes=boxes, masks=mask_inputs)
            n = sparse.shape[0]
            if sparse.shape[0] != dense.shape[0]:
                dense = dense.expand(n, -1, -1, -1)
        if text_ids is not None:
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder (empty vocabulary or 'none')")
            sparse = torch.cat([sparse, self.text_encoder(text_ids.to(emb.device))], dim=1)
        if emb.shape[0] not in (1, n):
            raise ValueError(f"{emb.shape[0]} images but {n} prompt sets")

        raw = self.expert_decoder(self.sam.mask_decoder, emb, self.dense_pe(), sparse, dense,
                               features.interm_embeddings, want_attention=want_heatmaps,
                               hq_features=features.hq, fusion_bf16=fusion_bf16)
        return self._finish(raw, multimask_output, want_heatmaps, emb.shape[-2:])

    def _finish(self, raw, multimask_output: bool, want_heatmaps: bool, hw) -> DecoderOutput:
        sam_slice = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou = raw.sam_masks[:, sam_slice], raw.iou_predictions[:, sam_slice]
        token = expert = conf = weights = heat = None
        balance = raw.sam_masks.new_zeros(())
        experts = raw.expert_masks is not None and (
            self.training or self.trained_parts is None or "experts" in self.trained_parts)
        if experts:  # untrained experts: SAM's own mask, never the random expert path
            last = raw.routings[-1]
            token, expert, weights = last.selected_token, last.selected_expert, last.token_weights
            rows = torch.arange(token.shape[0], device=token.device)
            probs = torch.softmax(last.logits[rows, token], dim=-1)
            conf = probs[rows, expert]
            balance = torch.stack([r.balance_loss for r in raw.routings]).sum()
            expert_score = stability_score(raw.expert_masks[:, 0]).unsqueeze(1)
            if multimask_output:
                masks = torch.cat([raw.expert_masks, masks], dim=1)
                iou = torch.cat([expert_score, iou], dim=1)
            else:
                masks, iou = raw.expert_masks, expert_score
            if want_heatmaps and raw.expert_attention is not None:
                heat = routing_heatmaps(raw.expert_attention, last.gates, hw)
        return DecoderOutput(masks, iou, raw.expert_masks, raw.sam_masks, raw.iou_predictions,
                             token, expert, conf, weights, balance, raw.routings, heat)


def routing_heatmaps(attention: Tensor, gates: Tensor, hw) -> Tensor:
    """Per expert, the mean min-max-normalised attention map of the tokens gated to it.

    Args:
        attention: (N, T, h*w) expert-token to image attention (heads averaged).
        gates: (N, T, E).
    Returns:
        (N, E, h, w) maps in [0, 1]; an expert no token was routed to gets zeros.
    """
    lo = attention.amin(-1, keepdim=True)
    hi = attention.amax(-1, keepdim=True)
    a = (attention - lo) / (hi - lo + 1e-12)
    routed = (gates > 0).float()                           # (N, T, E)
    denom = routed.sum(1).clamp_min(1.0)                   # (N, E)
    cams = torch.einsum("nte,ntp->nep", routed, a) / denom.unsqueeze(-1)
    return cams.reshape(cams.shape[0], cams.shape[1], *hw)
