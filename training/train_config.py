"""Training configuration: a YAML file read into frozen dataclasses (``segmote train CONFIG.yaml``).

Every key is documented in ``docs/training.md``. Unknown keys are errors (a typo must not silently
fall back to a default), and relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from segmote_core.config import SegMoTEConfig

__all__ = [
    "DataConfig", "OptimConfig", "LossConfig", "PromptConfig", "TrainConfig", "load_train_config",
]

PHASES = ("segmote", "sam")


@dataclass(frozen=True)
class DataConfig:
    """Which slices to train on.

    Attributes:
        cohort: path of the training cohort zarr (docs/formats.md, with ``labels`` per case).
        selection: optional ``selection.json`` from ``segmote curate``; its ``split`` part is used.
        split: the split of the selection to train on (``"train"``); ignored without selection.
        datasets: restrict to these dataset names (empty: all).
        slice_stride: without a selection, keep every n-th slice of a volume that has foreground.
        max_slices_per_case: cap per case after the stride (``None``: no cap).
        min_mask_pixels: masks smaller than this (at the model's input size) are dropped.
        balance_datasets: draw each batch item's dataset uniformly, then a mask of it (else
            masks uniformly, so big datasets dominate).
        category_weights: relative sampling weight per category (others 1.0), e.g.
            ``{white_matter: 2.0}`` to show a hard, thin structure more often.
    """

    cohort: str = ""
    selection: str | None = None
    split: str = "train"
    datasets: tuple[str, ...] = ()
    slice_stride: int = 1
    max_slices_per_case: int | None = None
    min_mask_pixels: int = 16
    balance_datasets: bool = True
    category_weights: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and run control (defaults of docs/model.md).

    Attributes:
        epochs: number of epochs.
        steps_per_epoch: optimiser steps per epoch; ``None``: one pass over all masks.
        batch_size: B slices per step (batched decoding, one prompt set each).
        lr: Adam learning rate.
        lr_milestones: epochs after which the lr is multiplied by ``lr_gamma``.
        lr_gamma: the factor (0.5 = halved).
        weight_decay: Adam weight decay.
        grad_clip: clip the gradient norm to this (0: off).
        masks_per_slice: up to this many masks of one slice per batch (B masks from about
            B / masks_per_slice slices): with the encoder in the loop (phase ``sam``) one
            encoder pass then serves several masks.
    """

    epochs: int = 14
    steps_per_epoch: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    lr_milestones: tuple[int, ...] = (7, 12)
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    masks_per_slice: int = 1


@dataclass(frozen=True)
class LossConfig:
    """``L = dice * Dice + bce * BCE + focal * Focal + iou * MSE(IoU head) + balance * L_bal``.

    ``sam_aux`` (phase ``segmote``): weight of SAM's own ambiguity-aware loss on its three masks
    for box/point steps, so SAM's prompt interface keeps working when its decoder trains too.
    """

    dice: float = 1.0
    bce: float = 0.0
    focal: float = 0.0
    iou: float = 0.0
    balance: float = 0.01
    sam_aux: float = 0.0


@dataclass(frozen=True)
class PromptConfig:
    """How training prompts are drawn from the ground truth (docs/model.md).

    Attributes:
        p_box, p_points, p_auto: probability of a box / points / text-or-PPT step (0.4/0.3/0.3).
            An auto step draws its batch from PPT-eligible masks (binary datasets, union masks)
            and prompts with PPT tokens; without PPT in the model it becomes a text-only step.
        max_pos_points, max_neg_points: points drawn per mask: 1..max positive, 0..max negative.
        box_jitter: each box side moves by up to this fraction of the box size (uniform).
        text_with_prompt: probability that the category's text token accompanies a box or
            points prompt; for a category that shares its slice with others of its dataset
            (e.g. grey matter inside the brain) it is always given, so the box is not ambiguous.
        ppt_guide_until: the guided-step probability of PPT decays linearly from
            ``ppt_guide_start`` to 0 over this fraction of all steps.
        ppt_guide_start: the guided-step probability at step 0.
        ppt_category_text: share of PPT steps that are *category-conditioned* (this project's
            extension of the paper's binary PPT, docs/model.md): the batch is drawn from every
            mask, of multi-category datasets too, and each carries its category's text token
            on every such step, to the end of training (the text is the question PPT answers
            at inference, ``segmote batch --categories``); the mask guide still follows the
            progressive schedule. 0 (default): the paper's PPT, binary targets only, the text
            guide fading with the mask guide.
        ppt_absent: in a category-conditioned step, the share of items whose text names a
            category of the slice's dataset that the slice does not hold, with an empty
            target: PPT learns to answer "none here" (a kidney asked for above the kidneys).
        p_free_box: probability of a *free-box* step (phase ``segmote``; this project's
            addition, docs/model.md): boxes of 15-50 % of each side centred anywhere on the
            body, not on a labelled structure, and as target the mask the frozen base model
            gives for that box (the pretrained base's own weights; for a from-scratch base,
            the SAM of ``init_checkpoint``: :mod:`training.teacher`).
            It keeps the trained model following any box the way its base does, on anatomy
            the labels never name. 0 (default): no such steps.
    """

    p_box: float = 0.4
    p_points: float = 0.3
    p_auto: float = 0.3
    max_pos_points: int = 3
    max_neg_points: int = 2
    box_jitter: float = 0.1
    text_with_prompt: float = 0.5
    ppt_guide_until: float = 0.5
    ppt_guide_start: float = 1.0
    ppt_category_text: float = 0.0
    ppt_absent: float = 0.25
    p_free_box: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run.

    Attributes:
        model: the SegMoTE model configuration (``SegMoTEConfig`` keys).
        phase: ``"segmote"`` (frozen encoder + prompt encoder, the SegMoTE parts train)
            or ``"sam"`` (SAM without expert tokens trained end to end, box/point prompts, SAM's
            ambiguity-aware loss; the text token names ambiguous categories when the model has
            a text guide; used only to make a tiny encoder when no pretrained SAM exists, i.e.
            the demo's phase 1).
        output_dir: run folder (checkpoints, metrics.csv, final model).
        sam_checkpoint: official SAM ``.pth`` for the base weights; the trained model records
            its file name, path and sha256 and is loaded on no other. ``None``: the weights of
            ``init_checkpoint``, or (vit_* models only with ``random_encoder``) random ones.
        random_encoder: train a vit_* model on a randomly initialised encoder, on purpose
            (``segmote train --random-encoder``); without it a vit_* config needs
            ``sam_checkpoint`` (or ``init_checkpoint``).
        init_checkpoint: a SegMoTE ``.safetensors`` (e.g. phase 1's) whose weights seed the model.
        cache_embeddings: pre-compute the frozen encoder's outputs once (phase ``segmote``).
        cache_path: where the embedding cache file goes (``None``: inside ``output_dir``).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda[:n]"``.
        amp: bf16 autocast on CUDA (ignored on CPU).
        num_threads: torch CPU threads (0: leave torch's default).
        seed: RNG seed for prompts, sampling, and the model's noisy gating.
        checkpoint_every: save a resumable checkpoint every n steps (and at each epoch end).
        augment: random flips and intensity jitter of images (phase ``sam`` only: cached
            embeddings are of the unaugmented slices).
    """

    model: SegMoTEConfig = field(default_factory=lambda: SegMoTEConfig(model_type="tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    phase: str = "segmote"
    output_dir: str = "runs/segmote"
    sam_checkpoint: str | None = None
    random_encoder: bool = False
    init_checkpoint: str | None = None
    cache_embeddings: bool = True
    cache_path: str | None = None
    device: str = "auto"
    amp: bool = True
    num_threads: int = 0
    seed: int = 0
    checkpoint_every: int = 200
    augment: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        p = self.prompts
        for name in ("p_box", "p_points", "p_auto", "text_with_prompt", "ppt_guide_until",
                     "ppt_guide_start", "ppt_category_text", "ppt_absent", "p_free_box"):
            value = getattr(p, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"prompts.{name} must be in [0, 1], got {value}")
        if p.p_box + p.p_points + p.p_auto <= 0:
            raise ValueError("prompts.p_box + p_points + p_auto must be > 0")
        if p.p_free_box and self.phase != "segmote":
            raise ValueError("prompts.p_free_box needs phase 'segmote' (its targets come from the "
                             "frozen base model)")
        if p.max_pos_points < 1 or p.max_neg_points < 0:
            raise ValueError("prompts.max_pos_points must be >= 1 and max_neg_points >= 0")
        o = self.optim
        if o.epochs < 1 or o.batch_size < 1 or o.lr <= 0:
            raise ValueError(f"optim: epochs, batch_size and lr must be positive, got "
                             f"epochs={o.epochs} batch_size={o.batch_size} lr={o.lr}")
        if o.steps_per_epoch is not None and o.steps_per_epoch < 1:
            raise ValueError(f"optim.steps_per_epoch must be >= 1, got {o.steps_per_epoch}")
        if list(o.lr_milestones) != sorted(o.lr_milestones):
            raise ValueError(f"optim.lr_milestones must be increasing, got {o.lr_milestones}")
        bad = {k: v for k, v in dict(self.data.category_weights).items()
               if not isinstance(v, (int, float)) or v <= 0}
        if bad:
            raise ValueError(f"data.category_weights must be positive numbers, got {bad}")
        if self.data.slice_stride < 1:
            raise ValueError(f"data.slice_stride must be >= 1, got {self.data.slice_stride}")
        mt = self.model.model_type
        if mt.startswith("vit_") and not (self.sam_checkpoint or self.init_checkpoint
                                          or self.random_encoder):
            raise ValueError(
                f"model.model_type {mt} needs sam_checkpoint: the official SAM {mt} .pth "
                f"(e.g. sam_vit_b_01ec64.pth); without it the encoder is random and the model "
                f"useless. To train on a random encoder on purpose, pass --random-encoder "
                f"(random_encoder: true)")
        if self.random_encoder and self.sam_checkpoint:
            raise ValueError("random_encoder and sam_checkpoint exclude each other")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON-safe); ``load_train_config`` reads it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SegMoTEConfig):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(value).items()}
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "loss": LossConfig,
             "prompts": PromptConfig}
_PATH_KEYS = ("output_dir", "sam_checkpoint", "init_checkpoint", "cache_path")


def _section(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: section must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or path == "":
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def train_config_from_dict(data: Mapping[str, Any], base_dir: str | Path = ".",
                           where: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from nested plain data; paths resolve against ``base_dir``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: the top level must be a mapping")
    base = Path(base_dir)
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(top)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "model":
            try:
                kwargs[key] = SegMoTEConfig.from_dict(dict(value or {}))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: model: {exc}") from exc
        elif key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], value or {}, f"{where}: {key}")
        elif key in _PATH_KEYS:
            kwargs[key] = _resolve(value, base)
        else:
            kwargs[key] = value
    if "data" in kwargs:
        d = kwargs["data"]
        kwargs["data"] = dataclasses.replace(d, cohort=_resolve(d.cohort, base) or "",
                                             selection=_resolve(d.selection, base))
    try:
        return TrainConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def load_train_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML training config; ``overrides`` are dotted keys (``{"optim.epochs": 2}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return train_config_from_dict(data, base_dir=path.parent, where=str(path))
