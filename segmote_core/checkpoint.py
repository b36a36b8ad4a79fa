"""Checkpoints: SegMoTE weights in safetensors + a JSON config that rebuilds them
(format: docs/formats.md).

File layout: ``name.safetensors`` holds the added tensors (and SAM's decoder when it was
fine-tuned, and the whole SAM when its base is not an official checkpoint, as for ``tiny``);
its metadata and the sidecar ``name.json`` hold the config, the base, the training summary and
package versions. Official SAM ``.pth`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .config import SegMoTEConfig
from .fileio import atomic_write
from .modeling import SegMoTE

__all__ = ["CheckpointError", "save_segmote", "load_segmote", "read_checkpoint_info",
           "load_sam_state_dict", "package_versions", "FORMAT_VERSION"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("segmote", "torch", "segment-anything", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _base_kind(model: SegMoTE, include_base: bool | None) -> str:
    if include_base is None:
        include_base = model.config.model_type == "tiny"
    return "embedded" if include_base else "sam_checkpoint"


def save_segmote(model: SegMoTE, path: str | Path, *, include_base: bool | None = None,
                 training: Mapping[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically.

    Args:
        include_base: store all of SAM too (default: only for ``tiny``, which has no official
            weights); otherwise users pass the official SAM checkpoint when loading.
        training: a summary of the training data/run, kept in the JSON.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: SegMoTE checkpoints are .safetensors files")
    base = _base_kind(model, include_base)
    state = model.state_dict()
    keep = [k for k in state if not k.startswith("sam.")]
    if base == "embedded":
        keep += [k for k in state if k.startswith("sam.")]
    elif model.config.train_decoder:
        keep += [k for k in state if k.startswith("sam.mask_decoder.")]
    tensors = {k: state[k].detach().cpu().contiguous() for k in keep}
    info = {
        "format": "segmote", "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "base": {"kind": base, "model_type": model.config.model_type},
        "decoder_included": base == "embedded" or model.config.train_decoder,
        "training": dict(training or {}),
        "versions": package_versions(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"segmote": json.dumps(info)}))
    atomic_write(path.with_suffix(".json"),
            lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, sort_keys=True)))
    return path


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The JSON description stored in a SegMoTE checkpoint (config, base, versions)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such SegMoTE checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "segmote" not in meta:
        raise CheckpointError(f"{path}: safetensors file without SegMoTE metadata")
    info = json.loads(meta["segmote"])
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {info['format_version']} is newer than "
                              f"this segmote ({FORMAT_VERSION}); upgrade segmote")
    return info


def load_segmote(path: str | Path, *, sam_checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu") -> SegMoTE:
    """Rebuild the model a SegMoTE checkpoint describes and load its weights (strict keys)."""
    from .build import _load_strict, build_segmote

    path = Path(path)
    info = read_checkpoint_info(path)
    config = SegMoTEConfig.from_dict(info["config"])
    base = info["base"]["kind"]
    if base == "sam_checkpoint" and sam_checkpoint is None:
        raise CheckpointError(
            f"{path}: these SegMoTE weights sit on the official SAM {config.model_type} "
            f"checkpoint; pass sam_checkpoint= (--sam-checkpoint) with its path")
    model = build_segmote(config, sam_checkpoint=sam_checkpoint if base != "embedded" else None,
                          compute_text_vectors=False)  # the vectors come from the file
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt tensors ({exc})") from exc
    full = model.state_dict()
    if base == "embedded":
        expected = set(full)
    else:
        expected = {k for k in full if not k.startswith("sam.")}
        if info.get("decoder_included"):
            expected |= {k for k in full if k.startswith("sam.mask_decoder.")}
    state = dict(full)
    state.update(tensors)
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit {config.model_type}: missing keys "
                              f"{missing[:8]}, unexpected keys {unexpected[:8]}")
    _load_strict(model, state, str(path))
    model.apply_freezing()
    return model.to(device).eval()


def load_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official SAM ``.pth`` (e.g. ``sam_vit_b_01ec64.pth``) safely.

    Keys may carry a ``sam.`` or ``module.`` prefix (fine-tuned copies); they are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: SAM checkpoint not found (download the official "
                              f"sam_vit_b_01ec64.pth yourself; segmote never downloads)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable SAM checkpoint ({type(exc).__name__}: "
                              f"{exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    for prefix in ("module.", "sam."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
