"""Which of a model's additions were trained, and what that allows.

SegMoTE adds two trainable parts to SAM: ``"experts"`` (expert tokens, MoTE routers, their
hypernetworks and the HQ fusion: the prompted expert path) and ``"ppt"`` (the prompt tokenizer
and text guide: prompt-free segmentation). A model read from a file knows which of them were
trained (``model.trained_parts``, recorded in the checkpoint; a bare SAM has none):

- prompt-free (auto) segmentation needs a trained ``"ppt"``; otherwise it is refused with
  :class:`UntrainedModelError`, saying to segment with prompts (``--mode box``) or train first;
- prompted segmentation of a model whose experts are untrained uses SAM's own mask, never the
  randomly initialised expert path.

A model built in code (:func:`segmote_core.build.build_segmote`, e.g. to train it) has
``trained_parts = None``: its caller decides, and nothing is refused.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["PARTS", "UntrainedModelError", "trained_parts", "parts_of", "auto_unavailable",
           "auto_refusal", "recorded_parts", "HOW_TO_TRAIN"]

PARTS = ("experts", "ppt")
HOW_TO_TRAIN = ("segment with prompts instead (`segmote batch --mode box`, or boxes and points "
                "in napari), or train the model first (docs/training.md)")


class UntrainedModelError(ValueError):
    """Prompt-free segmentation asked of a model whose PPT was never trained."""


def parts_of(config: Any) -> set[str]:
    """The additions a model of ``config`` has (``SegMoTEConfig``)."""
    out = set()
    if config.use_experts:
        out.add("experts")
    if config.use_ppt:
        out.add("ppt")
    return out


def trained_parts(model: Any) -> set[str] | None:
    """The model's trained additions, or ``None`` when unknown (built in code)."""
    parts = getattr(model, "trained_parts", None)
    return None if parts is None else set(parts)


def recorded_parts(info: Mapping[str, Any], config: Any) -> set[str]:
    """The trained parts a checkpoint's JSON records. Checkpoints written before this record
    existed count as trained when they carry a training summary (every training run writes
    one), untrained otherwise."""
    rec = info.get("trained")
    if isinstance(rec, (list, tuple)):
        return {str(p) for p in rec} & parts_of(config)
    return parts_of(config) if info.get("training") else set()


def auto_unavailable(model: Any) -> str | None:
    """Why prompt-free (auto / PPT) segmentation is refused for ``model``, or ``None``."""
    return auto_refusal(getattr(model, "ppt", None) is not None, trained_parts(model))


def auto_refusal(has_ppt: bool, parts: set[str] | None, where: str = "") -> str | None:
    """The message refusing prompt-free segmentation of a model with (or without) a PPT module
    and these trained parts (``None``: unknown, a model built in code), or ``None``."""
    at = f"{where}: " if where else ""
    if not has_ppt:
        what = ("a bare SAM (no SegMoTE weights)" if parts is not None and not parts
                else "this model has no PPT module")
        return f"{at}prompt-free segmentation needs a trained PPT; {what}: {HOW_TO_TRAIN}"
    if parts is not None and "ppt" not in parts:
        return (f"{at}prompt-free segmentation needs a trained PPT; this model's PPT was never "
                f"trained (its checkpoint records trained parts: "
                f"{', '.join(sorted(parts)) or 'none'}): {HOW_TO_TRAIN}")
    return None


def normalise(parts: Iterable[str] | None) -> frozenset[str] | None:
    if parts is None:
        return None
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trained parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    return frozenset(parts)
