"""Fine-tune a SegMoTE model from reviewed cases (the correction loop), Qt- and Ray-free.

Used by ``segmote train --from-corrections`` and by the napari Review panel alike. The model is
warm-started from the checkpoint that made the pre-labels; the image encoder stays frozen (its
outputs come from the embedding cache), and only the trainable additions learn: expert tokens,
MoTE, HQ fusion, PPT, the text guide, and SAM's mask decoder when the model was trained with it.
Every step is prompt-free (PPT), as ``segmote batch`` segments, on the reviewed masks.

A share of the reviewed cases (``val_fraction``, at least one when there are two or more) is
held out; the validation Dice (mean per-case Dice of PPT masks over the held-out cases' slices)
is measured before the first step and every ``eval_every`` steps, and the weights of the best
step are the result (the parent's own weights when no step beat them). With a single reviewed
case it is both trained on and validated on, and the lineage says so.

All randomness of step ``s`` comes from ``(seed, s)``; the state (trainable weights, Adam,
best weights, history) is saved atomically every ``checkpoint_every`` steps and on cancel, so a
cancelled run resumes to exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .fileio import atomic_write
from .inference import stack_embeddings
from .modeling import SegMoTE
from .predictor import model_signature
from .progress import CancelToken, Cancelled, ProgressCallback
from .reviewed import ReviewedCase
from .transforms import ResizePad

__all__ = ["FineTuneConfig", "FineTuneResult", "split_cases", "finetune", "validation_dice",
           "check_parent", "finetune_from_store"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineTuneConfig:
    """Settings of a fine-tune from reviewed cases (docs/training.md)."""

    steps: int = 150
    batch_size: int = 4
    lr: float = 2e-4
    val_fraction: float = 0.2
    eval_every: int = 25
    checkpoint_every: int = 25
    seed: int = 0
    bce: float = 1.0
    balance: float = 0.01


@dataclass
class FineTuneResult:
    model: SegMoTE                    # the best step's weights (eval mode)
    best_step: int
    steps: int
    dice_before: float
    dice_after: float
    history: list[tuple[int, float]]  # (step, validation Dice)
    train_cases: list[str]
    val_cases: list[str]
    seconds: float
    lineage: dict[str, Any] = field(default_factory=dict)


def split_cases(case_ids: Sequence[str], fraction: float, seed: int = 0
                ) -> tuple[list[str], list[str]]:
    """(train, validation) case ids: ``fraction`` of them held out (at least one when there are
    two or more), chosen by a hash of each id and the seed, so adding a case keeps the rest."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        return ids, []
    key = lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest()  # noqa: E731
    n_val = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    val = sorted(sorted(ids, key=key)[:n_val])
    return [c for c in ids if c not in val], val


def check_parent(model: SegMoTE, store_signature: dict[str, Any] | None, where: str) -> None:
    """Refuse a parent of another architecture than the model that made the pre-labels.

    Raises:
        ValueError: the configs differ (naming the fields); a different weight hash of the same
            architecture (a later round's model) is allowed and logged.
    """
    made_by = ((store_signature or {}).get("model") or {}).get("config")
    if not made_by:
        return
    mine = model.config.to_dict()
    arch = [k for k in sorted(set(made_by) | set(mine))
            if k not in ("vocabulary", "extra") and made_by.get(k) != mine.get(k)]
    if arch:
        raise ValueError(
            f"{where}: the parent checkpoint is another architecture than the model that made "
            f"these pre-labels: " + "; ".join(f"{k} {mine.get(k)!r} vs {made_by.get(k)!r}"
                                                for k in arch[:6]))


def _target(mask: np.ndarray, size: int) -> torch.Tensor:
    """(Y, X) bool -> (S, S) float at the encoder's input frame (resized, zero-padded)."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    rp = ResizePad(size)
    h, w = rp.new_size(*mask.shape)
    t = F.interpolate(t, size=(h, w), mode="nearest")[0, 0]
    return F.pad(t, (0, size - w, 0, size - h))


def _loss(logits: torch.Tensor, target: torch.Tensor, bce: float) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return dice.mean() + bce * F.binary_cross_entropy_with_logits(logits, target)


@torch.no_grad()
def validation_dice(model: SegMoTE, cases: Sequence[ReviewedCase]) -> float:
    """Mean over cases of the Dice of PPT masks against the reviewed masks (their slices)."""
    was = model.training
    model.eval()
    scores = []
    try:
        for case in cases:
            inter = total = 0
            for s in case.slices:
                feats, orig, inp = stack_embeddings(model, [s.embedding])
                out = model.decode(feats, auto=True)
                up = model.sam.postprocess_masks(out.low_res_masks[:, :1], inp, orig)
                pred = (up[0, 0] > 0).cpu().numpy()
                inter += int((pred & s.target).sum())
                total += int(pred.sum() + s.target.sum())
            scores.append(1.0 if total == 0 else 2 * inter / total)
    finally:
        model.train(was)
    return float(np.mean(scores)) if scores else float("nan")


def _trainable(model: SegMoTE) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _state_key(config: FineTuneConfig, parent_sha: str, train: list[str], val: list[str]) -> str:
    return json.dumps({"config": asdict(config), "parent": parent_sha, "train": train,
                       "val": val}, sort_keys=True)


def finetune(model: SegMoTE, cases: Sequence[ReviewedCase], config: FineTuneConfig = FineTuneConfig(),
             *, state_path: str | Path | None = None, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on ``cases`` (:func:`segmote_core.reviewed.load_reviewed`).

    Args:
        state_path: where the resumable state goes (``.pt``); an existing one of the same
            parent, cases and config is resumed, another one is ignored (and replaced).
        progress: ``(step, steps)`` after every step.
        cancel: stops between steps with :class:`~segmote_core.progress.Cancelled` after
            saving the state; ``model`` itself is never changed.
    """
    t0 = time.perf_counter()
    if not cases or not any(c.slices for c in cases):
        raise ValueError("no reviewed slice to fine-tune on")
    parent_sha = model_signature(model)["weights_sha256"]
    work = copy.deepcopy(model).cpu()
    work.apply_freezing()
    by_id = {c.case_id: c for c in cases}
    train_ids, val_ids = split_cases(list(by_id), config.val_fraction, config.seed)
    train = [by_id[c] for c in train_ids]
    val = [by_id[c] for c in val_ids] or train
    items = [(s.embedding, _target(s.target, work.image_size)) for c in train for s in c.slices]
    params = _trainable(work)
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    key = _state_key(config, parent_sha, train_ids, val_ids)
    state_path = Path(state_path) if state_path is not None else None

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in params.items()}

    step, history, best = 0, [], None
    if state_path is not None and state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved["weights"][n])
            opt.load_state_dict(saved["optimizer"])
            step, history = int(saved["step"]), [tuple(h) for h in saved["history"]]
            best = (int(saved["best_step"]), float(saved["best_dice"]), saved["best"])
            log.info("resuming the fine-tune at step %d of %d (%s)", step, config.steps,
                     state_path)
        else:
            log.warning("%s: a fine-tune state of other data or settings; starting over",
                        state_path)

    def save_state() -> None:
        if state_path is None:
            return
        state = {"key": key, "step": step, "weights": snapshot(), "optimizer": opt.state_dict(),
                 "history": [list(h) for h in history], "best_step": best[0],
                 "best_dice": best[1], "best": best[2]}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    if best is None:
        before = validation_dice(work, val)
        history.append((0, before))
        best = (0, before, snapshot())
    work.train()
    try:
        while step < config.steps:
            rng = np.random.default_rng((config.seed, step))
            pick = rng.integers(0, len(items), size=config.batch_size)
            feats, _, _ = _stack([items[i][0] for i in pick], work)
            target = torch.stack([items[i][1] for i in pick])
            torch.manual_seed(config.seed * 1_000_003 + step)
            out = work.decode(feats, auto=True)
            logits = F.interpolate(out.low_res_masks[:, :1].float(), size=target.shape[-2:],
                                   mode="bilinear", align_corners=False)[:, 0]
            loss = _loss(logits, target, config.bce) + config.balance * out.balance_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tune loss is {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            step += 1
            if step % config.eval_every == 0 or step == config.steps:
                dice = validation_dice(work, val)
                history.append((step, dice))
                if dice > best[1]:
                    best = (step, dice, snapshot())
            if step % config.checkpoint_every == 0:
                save_state()
            if progress is not None:
                progress(step, config.steps)
            if cancel is not None and cancel.cancelled and step < config.steps:
                save_state()
                raise Cancelled(f"fine-tune cancelled at step {step} of {config.steps}; "
                                f"rerun to resume from {state_path}")
    except KeyboardInterrupt:
        save_state()
        raise
    save_state()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[2][n])
    work.eval()
    shared = "" if val_ids else " (the only reviewed case: validated on its own slices)"
    lineage = {"parent_weights_sha256": parent_sha, "train_cases": train_ids,
               "val_cases": val_ids or train_ids, "steps": step, "best_step": best[0],
               "val_dice_before": history[0][1], "val_dice_after": best[1],
               "history": [list(h) for h in history], "config": asdict(config),
               "note": "prompt-free (PPT) fine-tune on reviewed cases" + shared}
    return FineTuneResult(work, best[0], step, history[0][1], best[1], history, train_ids,
                          val_ids or train_ids, time.perf_counter() - t0, lineage)


def _stack(embeddings: list[dict[str, Any]], model: SegMoTE):
    """Embeddings of slices of any size: their features are all (C, h, w) at the padded input
    frame, so they batch; only their sizes differ (not needed for the loss at S x S)."""
    same = [dict(e, original_size=(1, 1), input_size=(1, 1)) for e in embeddings]
    return stack_embeddings(model, same)


def finetune_from_store(out: str | Path, parent: SegMoTE | str | Path | None, new_path: str | Path,
                        *, cohort: str | Path | None = None,
                        config: FineTuneConfig = FineTuneConfig(),
                        sam_checkpoint: str | Path | None = None,
                        cache_dir: str | Path | None = None, state_path: str | Path | None = None,
                        cases: Sequence[str] | None = None,
                        progress: ProgressCallback | None = None,
                        cancel: CancelToken | None = None) -> FineTuneResult:
    """Fine-tune the parent on the reviewed cases of output store ``out``; write ``new_path``.

    Args:
        parent: the model that made the pre-labels (a loaded model, its ``.safetensors``, or
            ``None`` / ``"demo"`` for the bundled demo model).
        state_path: resumable state (default ``NEW.finetune_state.pt`` beside ``new_path``,
            removed once the new checkpoint is written).
        progress: ``(done, total)`` of the embedding phase, then of the steps.
    Returns:
        the result; ``new_path`` (+ ``.json``) records the lineage under ``training``.
    Raises:
        FineTuneDataError: no usable reviewed case, a cohort that does not match the store.
        ValueError: a parent of another architecture than the pre-labels' model.
    """
    from .build import demo_model_path, load_segmote
    from .checkpoint import read_checkpoint_info, save_segmote
    from .predictor import SegMoTEPredictor
    from .review import open_output
    from .reviewed import load_reviewed

    new_path = Path(new_path)
    parent_file = None
    if parent is None or (isinstance(parent, str) and parent == "demo"):
        parent = demo_model_path()
    if not isinstance(parent, SegMoTE):
        parent_file = Path(parent)
        parent = load_segmote(parent_file, sam_checkpoint=sam_checkpoint)
    store = open_output(out)
    check_parent(parent, store.attrs.get("signature"), str(store.path))
    predictor = SegMoTEPredictor(parent.eval(), precision="fp32")
    reviewed = load_reviewed(store, predictor, cohort=cohort, cases=cases, cache_dir=cache_dir,
                             progress=progress, cancel=cancel)
    state = Path(state_path) if state_path else new_path.with_suffix(".finetune_state.pt")
    result = finetune(parent, reviewed, config, state_path=state, progress=progress,
                      cancel=cancel)
    made_by = ((store.attrs.get("signature") or {}).get("model") or {}).get("weights_sha256")
    base_kind = (read_checkpoint_info(parent_file)["base"].get("kind") if parent_file
                 else getattr(parent, "base_source", {}).get("kind"))
    include = {"embedded": True, "sam_checkpoint": False, "package": None}.get(
        base_kind, None if parent.config.model_type == "lite_medsam" else
        parent.config.model_type == "tiny")
    result.lineage.update({
        "kind": "fine-tune from reviewed cases", "parent": str(parent_file) if parent_file
        else None, "prelabels_weights_sha256": made_by, "store": str(store.path),
        "cohort": str(store.cohort_path),
        "slices": {c.case_id: [s.z for s in c.slices] for c in reviewed}})
    result.model.base_source = getattr(parent, "base_source", {})
    save_segmote(result.model, new_path, include_base=include,
                 training={"lineage": result.lineage})
    state.unlink(missing_ok=True)
    log.info("wrote %s: validation Dice %.4f -> %.4f (best step %d of %d)", new_path,
             result.dice_before, result.dice_after, result.best_step, result.steps)
    return result
