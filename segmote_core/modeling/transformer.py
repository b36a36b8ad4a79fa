"""SAM's two-way transformer run with MoTE inserted in each block (docs/model.md).

Nothing here owns SAM weights: the functions run the stock ``segment_anything``
``TwoWayTransformer`` / ``TwoWayAttentionBlock`` sub-modules in SAM's own order, and insert the
MoTE router after the token-to-image attention. With no expert tokens the arithmetic is exactly
SAM's, which is what the equivalence test checks. Two CPU speed-ups keep those values (to float
rounding): the image tokens are kept row-major, and ``attend`` restates SAM's
``Attention.forward`` with a softmax that is fast on short rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import Tensor

from .mote import MoTERouter, RoutingResult

__all__ = ["TransformerOutput", "run_two_way_transformer", "attention_probs", "attend"]


@dataclass
class TransformerOutput:
    queries: Tensor                     # (B, N_tokens, C)
    keys: Tensor                        # (B, h*w, C)
    routings: list[RoutingResult] = field(default_factory=list)  # one per block with MoTE
    expert_attention: Tensor | None = None  # (B, T, h*w) last block's token->image attention


def attention_probs(attn: Attention, q: Tensor, k: Tensor) -> Tensor:
    """The softmax attention map of SAM's ``Attention`` for queries ``q`` and keys ``k``.

    Returns (B, heads, N_q, N_k). Used only for routing heat maps (docs/model.md, router step 8).
    """
    return _softmax_last(_scores(attn, q, k))


def _scores(attn: Attention, q: Tensor, k: Tensor) -> Tensor:
    """SAM's scaled attention logits (B, heads, N_q, N_k) before the softmax."""
    qh = attn._separate_heads(attn.q_proj(q), attn.num_heads)
    kh = attn._separate_heads(attn.k_proj(k), attn.num_heads)
    return qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])


def _softmax_last(scores: Tensor) -> Tensor:
    """``torch.softmax(scores, -1)``; at inference three vectorised passes instead.

    PyTorch's CPU softmax is slow on short rows (the image-to-token attention has 4096 rows
    of ~10 tokens per head: a third of that attention's time); the values agree to rounding.
    """
    if torch.is_grad_enabled():
        return torch.softmax(scores, dim=-1)
    e = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SAM's ``Attention.forward`` with its own weights and arithmetic (faster softmax)."""
    vh = attn._separate_heads(attn.v_proj(v), attn.num_heads)
    return attn.out_proj(attn._recombine_heads(_softmax_last(_scores(attn, q, k)) @ vh))


def _block_forward(block: TwoWayAttentionBlock, router: MoTERouter | None, queries: Tensor,
                   keys: Tensor, query_pe: Tensor, key_pe: Tensor, expert_slice: slice,
                   want_attention: bool) -> tuple[Tensor, Tensor, RoutingResult | None, Tensor | None]:
    # Self attention over all tokens (SAM's order and arithmetic).
    if block.skip_first_layer_pe:
        queries = attend(block.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + attend(block.self_attn, q, q, queries)
    queries = block.norm1(queries)

    # Token-to-image attention over all tokens. ``keys + key_pe`` serves both cross attentions:
    # the keys change only at the end of the block.
    q = queries + query_pe
    k = keys + key_pe
    queries = queries + attend(block.cross_attn_token_to_image, q, k, keys)
    queries = block.norm2(queries)
    attention = None
    if want_attention and router is not None:
        attention = attention_probs(block.cross_attn_token_to_image, q[:, expert_slice], k).mean(1)

    routing = None
    if router is None:
        queries = block.norm3(queries + block.mlp(queries))
    else:
        # SAM's token MLP on every token except the expert tokens, MoTE replaces the experts.
        start, stop = expert_slice.start, expert_slice.stop
        others = torch.cat([queries[:, :start], queries[:, stop:]], dim=1)
        others = block.norm3(others + block.mlp(others))
        experts, routing = router(queries[:, expert_slice])
        queries = torch.cat([others[:, :start], experts, others[:, start:]], dim=1)

    # Image-to-token attention.
    q = queries + query_pe
    keys = block.norm4(keys + attend(block.cross_attn_image_to_token, k, q, queries))
    return queries, keys, routing, attention


def run_two_way_transformer(
    transformer: TwoWayTransformer,
    routers: Sequence[MoTERouter] | None,
    image_embedding: Tensor,
    image_pe: Tensor,
    point_embedding: Tensor,
    expert_slice: slice,
    want_attention: bool = False,
) -> TransformerOutput:
    """Run SAM's ``TwoWayTransformer`` with one MoTE router per block.

    Args:
        transformer: the stock SAM transformer whose weights are used.
        routers: one ``MoTERouter`` per block, or ``None`` (plain SAM).
        image_embedding: (B, C, h, w).
        image_pe: (1 or B, C, h, w) positional encoding (broadcast over the batch).
        point_embedding: (B, N_tokens, C) output + expert + prompt tokens.
        expert_slice: where the expert tokens sit in ``point_embedding``.
        want_attention: keep the last block's expert-token attention for heat maps.
    """
    if routers is not None and len(routers) != len(transformer.layers):
        raise ValueError(f"{len(routers)} routers for {len(transformer.layers)} blocks")
    # (B, h*w, C) row-major: SAM's permuted view is column-major, which makes every add and
    # projection over the 4096 image tokens strided (same values, a third slower on CPU).
    image_embedding = image_embedding.flatten(2).transpose(1, 2).contiguous()
    image_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    queries, keys = point_embedding, image_embedding
    out = TransformerOutput(queries=queries, keys=keys)
    n_layers = len(transformer.layers)
    for i, layer in enumerate(transformer.layers):
        router = routers[i] if routers is not None else None
        queries, keys, routing, attention = _block_forward(
            layer, router, queries, keys, point_embedding, image_pe, expert_slice,
            want_attention and i == n_layers - 1,
        )
        if routing is not None:
            out.routings.append(routing)
        if attention is not None:
            out.expert_attention = attention

    q = queries + point_embedding
    k = keys + image_pe
    queries = queries + attend(transformer.final_attn_token_to_image, q, k, keys)
    out.queries = transformer.norm_final_attn(queries)
    out.keys = keys
    return out
