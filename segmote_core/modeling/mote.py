"""Mixture of Token Experts (docs/model.md): the router that updates SegMoTE's expert tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MoTERouter", "RoutingResult", "cv_squared", "straight_through"]


def straight_through(logp: Tensor) -> Tensor:
    """``exp(logp - logp.detach())``: exactly 1 in value, with the gradient of ``logp``.

    Multiplying a value by it leaves the value as it is and adds ``value * d logp`` to its
    gradient. Written with log-probabilities it stays finite for any logits; the ratio
    ``p / p.detach()`` is 0 / 0 once ``p`` underflows (a logit about 104 below the top one in
    float32), which turned gates, outputs and gradients into NaN.
    """
    return torch.exp(logp - logp.detach())


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(x) / (mean(x)^2 + 1e-10)`` over all elements.

    ``var`` is the unbiased sample variance (torch's default); a single element gives 0.
    """
    x = x.float().flatten()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


@dataclass
class RoutingResult:
    """What one MoTE router decided for a batch of expert tokens.

    Shapes: B images, T expert tokens, E experts, k experts per token.
    """

    logits: Tensor          # (B, T, E) router logits H (noisy in training)
    gates: Tensor           # (B, T, E) softmax over each token's top-k logits, 0 elsewhere
    topk_indices: Tensor    # (B, T, k)
    token_confidence: Tensor  # (B, T) c[b, t]: the token's largest logit (eq. 4)
    token_weights: Tensor   # (B, T) w = softmax_t(c) (eq. 5-6)
    selected_token: Tensor  # (B,) t* = argmax_t c
    selected_expert: Tensor  # (B,) e* = argmax_e H[b, t*, e]
    importance: Tensor      # (T, E) G summed over the batch
    load: Tensor            # (E,) G summed (training) or count of G > 0 (eval)
    balance_loss: Tensor    # () cv2(importance) + cv2(load)


class MoTERouter(nn.Module):
    """Noisy top-k gating over expert tokens, token selection and the expert update.

    The update replaces the expert tokens (no residual, as in the authors' code): each token goes
    to its top-k experts ``FFN_e = Linear(C, r)``, their outputs are combined by the gates, then
    ``Linear(r, r) -> Linear(r, r) -> Linear(r, C)``.
    """

    def __init__(self, *, dim: int, num_experts: int = 4, top_k: int = 1, rank: int = 64,
                 weight_tokens: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, {num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight_tokens = weight_tokens
        self.w_gate = nn.Parameter(torch.zeros(dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, num_experts))
        self.experts = nn.ModuleList(nn.Linear(dim, rank) for _ in range(num_experts))
        self.mix1 = nn.Linear(rank, rank)
        self.mix2 = nn.Linear(rank, rank)
        self.proj = nn.Linear(rank, dim)

    def route(self, x: Tensor) -> RoutingResult:
        """Gate expert tokens ``x`` of shape (B, T, C); noise only in training mode.

        Always in float32, autocast or not: the gates are a few (B, T, E) numbers, and under
        CUDA autocast bf16 logits would meet an fp32 softmax in the scatter below (a dtype
        error) and near-ties in bf16 would flip the selected token.
        """
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x.float())

    def _route(self, x: Tensor) -> RoutingResult:
        clean = x @ self.w_gate.float()
        if self.training:
            std = F.softplus(x @ self.w_noise.float()) + 1e-2
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        top_vals, top_idx = logits.topk(self.top_k, dim=-1)
        top_gates = torch.softmax(top_vals, dim=-1)
        if self.training and torch.is_grad_enabled():
            # Straight-through routing gradient: values stay exactly the documented gates, but
            # each selected expert's full-softmax log-probability, weighted by its gate, reaches
            # W_g (with k = 1 the top-k softmax is constant 1 and the router would otherwise
            # never learn; for k >= 2 this adds to the top-k softmax's own gradient:
            # docs/model.md). Log-probabilities keep it finite for any logits.
            logp = torch.log_softmax(logits, dim=-1).gather(-1, top_idx)
            top_gates = top_gates * straight_through(logp)
        gates = torch.zeros_like(logits).scatter(-1, top_idx, top_gates)
        confidence = top_vals[..., 0]  # largest logit per token (max over its top-k)
        selected_token = confidence.argmax(dim=1)
        rows = torch.arange(x.shape[0], device=x.device)
        selected_expert = logits[rows, selected_token].argmax(dim=-1)
        importance = gates.sum(dim=0)
        if self.training:
            load = gates.sum(dim=(0, 1))
        else:
            load = (gates > 0).sum(dim=(0, 1)).to(gates.dtype)
        return RoutingResult(
            logits=logits, gates=gates, topk_indices=top_idx, token_confidence=confidence,
            token_weights=torch.softmax(confidence, dim=1), selected_token=selected_token,
            selected_expert=selected_expert, importance=importance, load=load,
            balance_loss=cv_squared(importance) + cv_squared(load),
        )

    def expert_update(self, x: Tensor, gates: Tensor) -> Tensor:
        """Combine the experts' outputs by ``gates`` (B, T, E) and map back to width C."""
        weight = torch.stack([e.weight for e in self.experts])  # (E, r, C)
        bias = torch.stack([e.bias for e in self.experts])      # (E, r)
        per_expert = torch.einsum("btc,erc->bter", x, weight) + bias  # (B, T, E, r)
        combined = (gates.unsqueeze(-1) * per_expert).sum(dim=2)     # (B, T, r)
        return self.proj(self.mix2(self.mix1(combined)))

    def forward(self, x: Tensor) -> tuple[Tensor, RoutingResult]:
        """Return the new expert tokens (B, T, C), replacing ``x``, and the routing."""
        routing = self.route(x)
        update = self.expert_update(x, routing.gates)
        if self.weight_tokens:
            update = routing.token_weights.unsqueeze(-1) * update
        return update, routing
