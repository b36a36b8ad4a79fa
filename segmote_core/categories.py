"""Several categories per slice from one embedding: category-conditioned PPT into a label map.

Each slice is encoded once; then one PPT pass per category, with the category's text token
beside the PPT tokens (docs/model.md, "Category-conditioned PPT"), costs only the decoder.
The per-category logits (at the slice's own size) are resolved into one label map: a pixel
takes the value of the category whose logit is highest among those above 0 (ties: the earlier
category of the table), background where none is. Values follow the *label table*
``{"1": first category, "2": second, ...}``, which outputs store beside the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["resolve_categories", "label_table", "model_vocabulary", "CategoryResult",
           "segment_categories", "resolve_logits", "text_ids_for"]


def model_vocabulary(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The categories a model (its config dict, e.g. from a checkpoint's JSON) can be asked
    for by name: its text vocabulary, when it has PPT and a text encoder; else ``()``."""
    if not config.get("num_ppt_queries") or config.get("text_encoder", "learned") == "none":
        return ()
    return tuple(config.get("vocabulary") or ())


def resolve_categories(names: Sequence[str], vocabulary: Sequence[str],
                       where: str = "the model") -> tuple[str, ...]:
    """The categories asked for, checked against ``vocabulary`` (``all``: all of it, in its
    order). Duplicates are dropped, the first occurrence keeps its place.

    Raises:
        ValueError: the model knows no categories, or a name it does not know (the message
            lists the known ones).
    """
    vocabulary = tuple(vocabulary)
    if not vocabulary:
        raise ValueError(f"--categories: {where} has no category vocabulary (no PPT or no text "
                         f"guide); use a SegMoTE model trained with categories")
    names = [str(n) for n in names]
    if not names:
        raise ValueError("--categories: name at least one category, or 'all'")
    if "all" in names:
        if len(names) > 1:
            raise ValueError("--categories all stands alone (it is the whole vocabulary)")
        return vocabulary
    unknown = [n for n in names if n not in vocabulary]
    if unknown:
        raise ValueError(f"--categories: {where} does not know {', '.join(unknown)}; known "
                         f"categories: {', '.join(vocabulary)} (or 'all')")
    return tuple(dict.fromkeys(names))


def text_ids_for(model: Any, category: str | None, n: int) -> torch.Tensor | None:
    """``(n,)`` vocabulary indices of ``category`` for ``model.decode(text_ids=...)``
    (``None`` for no category); an unknown name raises listing the known ones."""
    if category is None:
        return None
    (name,) = resolve_categories([category], model_vocabulary(model.config.to_dict()))
    index = model.config.vocabulary.index(name)
    return torch.full((n,), index, dtype=torch.long, device=model.device)


def label_table(categories: Sequence[str]) -> dict[str, str]:
    """``{"1": categories[0], "2": categories[1], ...}``: label value -> category."""
    return {str(i + 1): str(c) for i, c in enumerate(categories)}


def resolve_logits(logits: torch.Tensor) -> torch.Tensor:
    """(K, B, Y, X) per-category logits -> (B, Y, X) int64 label values (0 = background):
    the category (1-based) with the highest logit where that logit is above 0."""
    best, index = logits.max(dim=0)          # max returns the first of equal maxima
    return torch.where(best > 0, index + 1, torch.zeros_like(index))


@dataclass
class CategoryResult:
    """B slices segmented for K categories.

    Attributes:
        labels: (B, Y, X) uint8 (uint16 for K > 255) label values of the label table.
        confidence: (K, B) router confidence per category (NaN: no experts).
        expert: (K, B) selected expert per category (-1: none).
        signals: per category the decoder-side QC components of its own mask (before the
            label map resolved overlaps): ``{"iou_head", "stability", "reprompt", "area"}``,
            each (B,).
    """

    labels: np.ndarray
    confidence: np.ndarray
    expert: np.ndarray
    signals: list[dict[str, np.ndarray]] = field(default_factory=list)


@torch.inference_mode()
def segment_categories(model: Any, slices: Sequence[np.ndarray] | np.ndarray,
                       categories: Sequence[str], modality: str = "auto", *, window=None,
                       precision: str = "auto", chunk: int = 8, qc: bool = True
                       ) -> CategoryResult:
    """Segment B slices for each of ``categories`` (names of the model's vocabulary), each
    slice encoded once; the label map resolves overlaps by the higher logit.

    Args:
        slices: (B, Y, X) or (B, Y, X, 3), or a sequence of same-shaped 2D images.
        qc: also compute the decoder-side QC components per category (the re-prompt
            component decodes once more per category, prompted by the mask's box and the
            category's text token).
    """
    from .inference import encode_batch, prepare_batch
    from .predictor import use_bf16
    from .qc import decoder_signals

    vocab = model_vocabulary(model.config.to_dict())
    names = resolve_categories(categories, vocab)
    ids = [vocab.index(n) for n in names]
    bf16 = use_bf16(model, precision)
    k, n = len(ids), len(slices)
    dtype = np.uint8 if k <= 255 else np.uint16
    labels, conf, expert = [], np.full((k, n), np.nan, np.float32), np.full((k, n), -1, np.int16)
    signals = [{s: np.full(n, np.nan if s != "area" else 0.0, np.float32)
                for s in ("iou_head", "stability", "reprompt", "area")} for _ in ids]
    for start in range(0, n, chunk):
        part = slices[start:start + chunk]
        batch, original, input_size = prepare_batch(model, part, modality, window)
        feats = encode_batch(model, batch, chunk, bf16)
        m = len(part)
        logits = torch.empty((k, m, *original), dtype=torch.float32)
        for j, idx in enumerate(ids):
            text = torch.full((m,), idx, dtype=torch.long, device=model.device)
            out = model.decode(feats, auto=True, text_ids=text)
            low = out.low_res_masks[:, :1].float()
            if not bool(torch.isfinite(low).all()):
                raise FloatingPointError(
                    f"the model produced non-finite mask logits (NaN/inf) for category "
                    f"{names[j]!r}: its weights or this input overflow; check the checkpoint")
            logits[j] = model.sam.postprocess_masks(low, input_size, original)[:, 0].cpu()
            rows = slice(start, start + m)
            if out.confidence is not None:
                conf[j, rows] = out.confidence.float().cpu().numpy()
                expert[j, rows] = out.selected_expert.cpu().numpy()
            if qc:
                got = decoder_signals(model, feats, out, original, input_size, text_ids=text)
                for name, values in got.as_dict().items():
                    signals[j][name][rows] = values
            else:
                signals[j]["area"][rows] = (logits[j] > 0).flatten(1).sum(1).numpy()
        labels.append(resolve_logits(logits).numpy().astype(dtype))
    return CategoryResult(np.concatenate(labels), conf, expert, signals)
