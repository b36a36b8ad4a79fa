"""Resumable training checkpoints (docs/formats.md: model + trainer state).

A checkpoint folder holds ``model.safetensors`` (+ ``.json``), written by the core's
:func:`segmote_core.checkpoint.save_segmote`, and ``trainer_state.pt`` (optimiser state, position
in the schedule, torch RNG, the run's config), written last and atomically. The state names the
global step that the model file's metadata also records; a resume checks that both agree, so a
half-written checkpoint is detected instead of trusted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from segmote_core.checkpoint import read_checkpoint_info, save_segmote, upgrade_state_keys
from segmote_core.fileio import atomic_write
from segmote_core.modeling import SegMoTE

__all__ = ["TrainPosition", "save_training_checkpoint", "load_training_checkpoint",
           "load_matching_weights", "MODEL_FILE", "STATE_FILE"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainPosition:
    """Where the schedule stands: the next step to run is ``step`` of ``epoch`` (0-based)."""

    epoch: int
    step: int
    global_step: int


def save_training_checkpoint(folder: str | Path, model: SegMoTE, optimizer: torch.optim.Optimizer,
                             position: TrainPosition, *, config: dict[str, Any],
                             summary: dict[str, Any], include_base: bool | None = None) -> Path:
    """Write the model, then the trainer state (the completion marker)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    training = dict(summary, global_step=position.global_step, epoch=position.epoch,
                    step_in_epoch=position.step)
    save_segmote(model, folder / MODEL_FILE, include_base=include_base, training=training)
    state = {
        "optimizer": optimizer.state_dict(),
        "epoch": position.epoch, "step": position.step, "global_step": position.global_step,
        "config_json": json.dumps(config, sort_keys=True),
        "torch_rng": torch.get_rng_state(),
    }
    atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
    return folder


def load_matching_weights(model: SegMoTE, path: str | Path, *, require_prefix: str | None = None
                          ) -> list[str]:
    """Load every tensor of a SegMoTE ``.safetensors`` whose key and shape fit ``model``.

    Args:
        require_prefix: every model key with this prefix must be in the file (e.g. ``"sam."``
            when seeding a phase-2 model from a phase-1 tiny SAM).
    Returns:
        the loaded keys.
    Raises:
        ValueError: nothing fits, or keys under ``require_prefix`` are missing.
    """
    path = Path(path)
    read_checkpoint_info(path)  # validates the file and its metadata
    tensors = upgrade_state_keys(load_file(str(path)))
    state = model.state_dict()
    loaded = {k: v for k, v in tensors.items() if k in state and state[k].shape == v.shape}
    if not loaded:
        raise ValueError(f"{path}: no tensor fits this model ({model.config.model_type})")
    if require_prefix is not None:
        missing = sorted(k for k in state if k.startswith(require_prefix) and k not in loaded)
        if missing:
            raise ValueError(f"{path}: lacks {len(missing)} '{require_prefix}' tensors of this "
                             f"model, e.g. {missing[:4]}")
    skipped = sorted(set(tensors) - set(loaded))
    model.load_state_dict(loaded, strict=False)
    log.info("%s: loaded %d tensors, skipped %d (%s)", path, len(loaded), len(skipped),
             ", ".join(skipped[:4]))
    return sorted(loaded)


def load_training_checkpoint(folder: str | Path, model: SegMoTE,
                             optimizer: torch.optim.Optimizer, *, config: dict[str, Any]
                             ) -> TrainPosition:
    """Restore model weights, optimiser state and torch RNG; return the position to resume at.

    Raises:
        ValueError: the model and state files disagree (an interrupted write), or the run's
            model/phase configuration differs from the checkpoint's.
    """
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    info = read_checkpoint_info(folder / MODEL_FILE)
    if info.get("training", {}).get("global_step") != state["global_step"]:
        raise ValueError(f"{folder}: model file (step {info.get('training', {}).get('global_step')}) "
                         f"and trainer state (step {state['global_step']}) disagree; the "
                         f"checkpoint was interrupted while being written")
    saved = json.loads(state["config_json"])
    for key in ("model", "phase"):
        if saved.get(key) != config.get(key):
            raise ValueError(f"{folder}: cannot resume: '{key}' differs from the checkpoint's "
                             f"({saved.get(key)!r} vs {config.get(key)!r})")
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if changed:
        log.warning("resuming %s with changed settings: %s", folder, ", ".join(changed))
    tensors = load_file(str(folder / MODEL_FILE))
    model_state = model.state_dict()
    unexpected = sorted(set(tensors) - set(model_state))
    if unexpected:
        raise ValueError(f"{folder / MODEL_FILE}: keys not in the model: {unexpected[:4]}")
    model.load_state_dict(tensors, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return TrainPosition(int(state["epoch"]), int(state["step"]), int(state["global_step"]))
