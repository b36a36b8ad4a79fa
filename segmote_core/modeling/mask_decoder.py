"""SegMoTE's decoder: SAM's ``MaskDecoder`` plus expert tokens, MoTE and HQ-style fusion.

``SegMoTEMaskDecoder`` owns only the added parameters; the stock decoder is passed in at call
time, so SAM's state dict keeps its own keys and official checkpoints load unchanged.

Token order: ``[IoU, 4 mask tokens, T expert tokens, sparse prompt tokens]`` (docs/model.md).
Batching: ``image_embeddings`` of batch 1 with N prompt sets (stock SAM), or of batch N with
N prompt sets (one per image, no repeat of the embeddings).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from torch import Tensor, nn

from .fast_ops import conv_to_one_channel, run_stack
from .mote import MoTERouter, RoutingResult, straight_through
from .transformer import run_two_way_transformer

__all__ = ["SegMoTEMaskDecoder", "RawDecoderOutput"]


@dataclass
class RawDecoderOutput:
    sam_masks: Tensor                 # (N, 4, 4h, 4w) all of SAM's mask-token outputs
    iou_predictions: Tensor           # (N, 4)
    expert_masks: Tensor | None       # (N, 1, 4h, 4w) mask of the selected expert token
    routings: list[RoutingResult]
    expert_attention: Tensor | None   # (N, T, h*w)


class SegMoTEMaskDecoder(nn.Module):
    """The added decoder parameters and the decoding pass (docs/model.md)."""

    def __init__(self, *, dim: int, depth: int, vit_dim: int, num_expert_tokens: int = 4,
                 num_experts: int = 4, top_k: int = 1, rank: int = 64,
                 weight_tokens: bool = False, hq_fusion: bool = True) -> None:
        super().__init__()
        self.num_expert_tokens = num_expert_tokens
        self.hq_fusion = hq_fusion and num_expert_tokens > 0
        if num_expert_tokens == 0:
            return
        self.expert_tokens = nn.Embedding(num_expert_tokens, dim)
        self.routers = nn.ModuleList(
            MoTERouter(dim=dim, num_experts=num_experts, top_k=top_k, rank=rank,
                       weight_tokens=weight_tokens)
            for _ in range(depth)
        )
        self.expert_hypernetworks = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(num_expert_tokens)
        )
        if self.hq_fusion:
            self.compress_vit_feat = nn.Sequential(
                nn.ConvTranspose2d(vit_dim, dim, kernel_size=2, stride=2), LayerNorm2d(dim),
                nn.GELU(), nn.ConvTranspose2d(dim, dim // 8, kernel_size=2, stride=2))
            self.embedding_encoder = nn.Sequential(
                nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4),
                nn.GELU(), nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2))
            self.feature_fusion = nn.Sequential(
                nn.Conv2d(dim // 8, dim // 4, 3, 1, 1), LayerNorm2d(dim // 4), nn.GELU(),
                nn.Conv2d(dim // 4, dim // 8, 3, 1, 1))

    @property
    def use_experts(self) -> bool:
        return self.num_expert_tokens > 0

    def forward(
        self,
        sam_decoder: MaskDecoder,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        interm_embeddings: Tensor | None = None,
        want_attention: bool = False,
        hq_features: Tensor | None = None,
        fusion_bf16: bool = False,
    ) -> RawDecoderOutput:
        """Decode masks.

        Args:
            sam_decoder: the stock SAM decoder (its tokens, transformer, heads are used).
            image_embeddings: (1 or N, C, h, w).
            image_pe: (1, C, h, w).
            sparse_prompt_embeddings: (N, P, C) point/box/PPT/text tokens.
            dense_prompt_embeddings: (N, C, h, w).
            interm_embeddings: (1 or N, h, w, D_vit) early ViT features for the fusion branch.
            want_attention: keep the expert tokens' attention maps (routing heat maps).
            hq_features: (1 or N, C/8, 4h, 4w) from :meth:`hq_features`, when already computed
                for these images (the predictor keeps them per image).
            fusion_bf16: run the per-prompt fusion convs under bf16 autocast (inference on
                hardware with native bf16; the rest of the decoder stays fp32).
        """
        n = sparse_prompt_embeddings.shape[0]
        b = image_embeddings.shape[0]
        if b not in (1, n):
            raise ValueError(
                f"image_embeddings has batch {b} but there are {n} prompt sets: give one image "
                f"with N prompt sets, or N images with one prompt set each")
        out_tokens = [sam_decoder.iou_token.weight, sam_decoder.mask_tokens.weight]
        if self.use_experts:
            out_tokens.append(self.expert_tokens.weight)
        output_tokens = torch.cat(out_tokens, dim=0).unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        # One image with N prompt sets: broadcasting gives SAM's repeat_interleave values
        # without copying the embedding and its positional encoding N times.
        src = (image_embeddings + dense_prompt_embeddings).expand(n, -1, -1, -1)
        _, c, h, w = src.shape

        n_mask = sam_decoder.num_mask_tokens
        expert_slice = slice(1 + n_mask, 1 + n_mask + self.num_expert_tokens)
        result = run_two_way_transformer(
            sam_decoder.transformer, self.routers if self.use_experts else None,
            src, image_pe, tokens, expert_slice, want_attention and self.use_experts,
        )
        hs = result.queries
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + n_mask, :]

        upscaled = run_stack(sam_decoder.output_upscaling,
                             result.keys.transpose(1, 2).reshape(n, c, h, w))
        hyper_in = torch.stack(
            [sam_decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
             for i in range(n_mask)], dim=1)
        _, c8, h4, w4 = upscaled.shape
        masks = (hyper_in @ upscaled.flatten(2)).reshape(n, -1, h4, w4)  # flatten: a view
        iou_pred = sam_decoder.iou_prediction_head(iou_token_out)

        expert_masks = None
        if self.use_experts and self.hq_fusion and hq_features is None:
            hq_features = self.hq_features(image_embeddings, interm_embeddings)
        if self.use_experts:
            expert_masks = self._expert_mask(hs[:, expert_slice], upscaled, hq_features,
                                             result.routings[-1], fusion_bf16)
        return RawDecoderOutput(masks, iou_pred, expert_masks, result.routings,
                                result.expert_attention)

    def hq_features(self, image_embeddings: Tensor, interm_embeddings: Tensor | None) -> Tensor:
        """Per-image fusion features (B, C/8, 4h, 4w): image embedding + early ViT block."""
        if interm_embeddings is None:
            raise ValueError("hq_fusion needs interm_embeddings (early ViT features)")
        return (run_stack(self.embedding_encoder, image_embeddings)
                + run_stack(self.compress_vit_feat, interm_embeddings.permute(0, 3, 1, 2)))

    def _expert_mask(self, expert_out: Tensor, upscaled: Tensor, hq_features: Tensor | None,
                     routing: RoutingResult, fusion_bf16: bool = False) -> Tensor:
        """Only the token the last router selected predicts, through its own hypernetwork.

        ``mask = s . (fusion(upscaled) + hq)`` with ``s`` the selected token's hypernetwork
        output. The fusion's last conv is linear, so ``s`` is folded into its weights: one
        output channel per prompt instead of C/8 (the same arithmetic, C/8 times cheaper).
        """
        n, c8, h4, w4 = upscaled.shape
        hyper = torch.stack([mlp(expert_out[:, t]) for t, mlp in
                             enumerate(self.expert_hypernetworks)], dim=1)  # (N, T, C/8)
        rows = torch.arange(n, device=hyper.device)
        selected = hyper[rows, routing.selected_token]  # (N, C/8)
        if self.training and torch.is_grad_enabled():
            # Straight-through: value unchanged, gradient reaches the token confidence c[t*].
            logw = torch.log_softmax(routing.token_confidence, dim=1)
            selected = selected * straight_through(logw[rows, routing.selected_token]
                                                   .unsqueeze(1))
        if not self.hq_fusion:
            return (selected.unsqueeze(1) @ upscaled.flatten(2)).reshape(n, 1, h4, w4)
        last = self.feature_fusion[-1]
        weight = torch.einsum("nc,cikl->nikl", selected, last.weight)  # (N, C/4, 3, 3)
        ctx = (torch.autocast(upscaled.device.type, dtype=torch.bfloat16) if fusion_bf16
               else contextlib.nullcontext())
        with ctx:
            hidden = run_stack(self.feature_fusion[:-1], upscaled)  # (N, C/4, 4h, 4w)
            mask = conv_to_one_channel(hidden, weight.to(hidden.dtype))
        mask = mask.float().reshape(n, h4 * w4)
        mask = mask + (selected @ last.bias).unsqueeze(1)
        hq = hq_features.flatten(2)  # (1 or N, C/8, 4h*4w), a view in either memory format
        mask = mask + (selected.unsqueeze(1) @ hq).squeeze(1)
        return mask.reshape(n, 1, h4, w4)
