"""The training loop (``segmote train CONFIG.yaml``).

Adam (lr 1e-4), the lr multiplied by ``lr_gamma`` after each epoch of ``lr_milestones``
(halved after epochs 7 and 12 by default); B slices decoded per step with one prompt set each;
the frozen encoder's outputs pre-computed once (:mod:`training.precompute`); a resumable
checkpoint every ``checkpoint_every`` steps, at each epoch end and on interruption (Ctrl-C or a
:class:`~segmote_core.progress.CancelToken`); one CSV row of metrics per step; tqdm progress.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmote_core.build import build_segmote
from segmote_core.checkpoint import save_segmote
from segmote_core.device import bf16_native, configure_cuda
from segmote_core.modeling import ImageFeatures, SegMoTE
from segmote_core.progress import CancelToken, Cancelled, ProgressCallback

from .checkpointing import (STATE_FILE, TrainPosition, load_matching_weights,
                            load_training_checkpoint, save_training_checkpoint)
from .dataset import SliceDataset, build_slice_dataset, model_input
from .precompute import FeatureCache, load_or_compute_features, parts_dir
from .prompts import PromptSampler
from .step import augment_batch, training_loss
from .teacher import build_teacher, teacher_masks
from .train_config import TrainConfig

__all__ = ["Trainer", "TrainResult", "lr_at_epoch", "resolve_device"]

log = logging.getLogger(__name__)

CSV_FIELDS = ["epoch", "step", "global_step", "lr", "mode", "guide", "loss", "seg", "dice",
              "balance", "seconds"]


def lr_at_epoch(config: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: milestones count epochs from 1 ("after epoch 7")."""
    o = config.optim
    return o.lr * o.lr_gamma ** sum(1 for m in o.lr_milestones if epoch >= m)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    model_path: Path | None       # final model (None when the run stopped early)
    checkpoint: Path              # the resumable checkpoint folder
    metrics_csv: Path
    position: TrainPosition       # next step to run
    last_loss: float
    seconds: float


class Trainer:
    """Builds the dataset, model, optimiser and prompt sampler of a :class:`TrainConfig`.

    Args:
        config: the run.
        dataset: use these slices instead of reading ``config.data`` (tests, scripts).
        resume: continue from ``output_dir/checkpoint`` when it holds a complete checkpoint.
    """

    def __init__(self, config: TrainConfig, *, dataset: SliceDataset | None = None,
                 resume: bool = True) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        # bf16 autocast only on GPUs that compute bf16 in hardware (emulated bf16 on V100/T4
        # is slower than fp32)
        self.autocast = config.amp and self.device.type == "cuda" and bf16_native(self.device)
        if config.amp and self.device.type == "cuda" and not self.autocast:
            log.warning("amp: this GPU has no native bf16; training in fp32 (TF32 matmuls)")
        configure_cuda()
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoint"
        self.metrics_csv = self.out / "metrics.csv"
        size = config.model.resolved_image_size
        self.dataset = dataset if dataset is not None else build_slice_dataset(
            config.data.cohort, image_size=size, selection=config.data.selection,
            split=config.data.split if config.data.selection else None,
            datasets=config.data.datasets, slice_stride=config.data.slice_stride,
            max_slices_per_case=config.data.max_slices_per_case,
            min_mask_pixels=config.data.min_mask_pixels)
        if self.dataset.image_size != size:
            raise ValueError(f"dataset slices are {self.dataset.image_size} px but the model "
                             f"takes {size} px")
        torch.manual_seed(config.seed)  # the same config gives the same initial weights
        self.model = self._build_model()
        # the free-box steps' teacher: the base as built, before any resumed or trained weights
        self.teacher = (build_teacher(self.model, config.sam_checkpoint, self.device)
                        if config.prompts.p_free_box > 0 else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.optim.lr,
                                          weight_decay=config.optim.weight_decay)
        self.sampler = PromptSampler(
            self.dataset, config.prompts, batch_size=config.optim.batch_size,
            vocabulary=self.model.config.vocabulary if self.model.text_encoder is not None else (),
            use_auto=self.model.ppt is not None and config.phase == "segmote",
            balance_datasets=config.data.balance_datasets,
            category_weights=config.data.category_weights,
            masks_per_slice=config.optim.masks_per_slice, seed=config.seed)
        self.steps_per_epoch = config.optim.steps_per_epoch or max(
            1, int(np.ceil(self.dataset.num_masks / config.optim.batch_size)))
        self.total_steps = self.steps_per_epoch * config.optim.epochs
        self.position = TrainPosition(0, 0, 0)
        if resume and (self.ckpt_dir / STATE_FILE).is_file():
            from segmote_core.checkpoint import check_base, read_checkpoint_info

            from .checkpointing import MODEL_FILE

            saved = read_checkpoint_info(self.ckpt_dir / MODEL_FILE)["base"]
            check_base(self.ckpt_dir, saved, getattr(self.model, "base_source", {}))
            self.position = load_training_checkpoint(self.ckpt_dir, self.model, self.optimizer,
                                                     config=self._config_dict())
            self.position = self._normalized(self.position)
            log.info("resumed %s at epoch %d step %d (global step %d)", self.ckpt_dir,
                     self.position.epoch, self.position.step, self.position.global_step)
        self.cache: FeatureCache | None = None
        self._masks = torch.from_numpy(self.dataset.masks)

    # ----------------------------------------------------------------------------- setup
    def _config_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d["model"] = self.model.config.to_dict() if hasattr(self, "model") else d["model"]
        return d

    def _build_model(self) -> SegMoTE:
        c = self.config
        mcfg = c.model
        if c.phase == "sam":  # SAM (+ the text guide, when the model has one) end to end
            mcfg = mcfg.replace(num_expert_tokens=0)
        if not mcfg.vocabulary:
            mcfg = mcfg.replace(vocabulary=self.dataset.vocabulary())
        model = build_segmote(mcfg, sam_checkpoint=c.sam_checkpoint)
        if c.init_checkpoint:
            # the SAM of a from-scratch base (tiny) comes from the init file; a packaged base
            # (LiteMedSAM) is built from its package and the file adds what was trained
            need = ("sam." if (c.phase == "segmote" and c.sam_checkpoint is None
                               and mcfg.model_type != "lite_medsam") else None)
            load_matching_weights(model, c.init_checkpoint, require_prefix=need)
            if need:  # SAM's weights now come from that file: record it as the base
                from segmote_core.checkpoint import read_checkpoint_info, sam_base_source

                init = sam_base_source(c.init_checkpoint)
                model.base_source = {**init, "name": "SAM of a SegMoTE checkpoint",
                                     "from": read_checkpoint_info(c.init_checkpoint)["base"]}
        if c.phase == "sam":
            model.base_source = {"name": "SAM trained end to end (phase sam)",
                                 "from": model.base_source}
        if c.phase == "sam":
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.sam.parameters():
                p.requires_grad_(True)
            if model.text_encoder is not None:
                for p in model.text_encoder.parameters():
                    p.requires_grad_(True)
        else:
            model.apply_freezing()
        return model.to(self.device).train()

    def _features(self, slice_ids: np.ndarray, batch, masks: torch.Tensor):
        """Encoder outputs of the batch (cache or encoder) and the (maybe augmented) targets.

        Without the cache each distinct slice is encoded once, however many masks it brings.
        """
        if self.cache is not None:
            return self.cache.get(slice_ids, self.device), masks
        unique, inverse = np.unique(slice_ids, return_inverse=True)
        images = self.dataset.images[unique]
        if self.config.augment and self.config.phase == "sam":
            rng = np.random.default_rng((self.config.seed, 7919, self.position.global_step))
            images, m = augment_batch(images, masks.numpy(), batch,
                                      self.dataset.extents[unique], inverse, rng)
            masks = torch.from_numpy(m)
        x = model_input(self.model, images, self.dataset.extents[unique])
        grad = torch.enable_grad() if self.config.phase == "sam" else torch.no_grad()
        with grad:
            feats = self.model.encode(x, autocast=self.autocast)
            index = torch.as_tensor(inverse, device=self.device)
            interm = feats.interm_embeddings
            feats = ImageFeatures(feats.image_embeddings.index_select(0, index),
                                  interm.index_select(0, index) if interm is not None else None)
        return feats, masks

    @property
    def cache_file(self) -> Path:
        c = self.config
        return Path(c.cache_path) if c.cache_path else self.out / "embeddings.safetensors"

    def prepare_cache(self, progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None, show_progress: bool = False) -> None:
        """Pre-compute the frozen encoder's outputs (phase ``segmote`` with cache_embeddings),
        chunk by chunk (an interrupted pre-compute resumes), with a tqdm bar (and ETA) when
        ``show_progress``."""
        if self.config.phase != "segmote" or not self.config.cache_embeddings:
            return
        from tqdm.auto import tqdm

        bar = None

        def tick(done: int, total: int) -> None:
            nonlocal bar
            if bar is None and show_progress:   # starts at what a previous run left
                bar = tqdm(total=total, initial=done, unit="slice", desc="embeddings")
            elif bar is not None:
                bar.update(done - bar.n)
            if progress is not None:
                progress(done, total)
        try:
            self.cache = load_or_compute_features(self.model, self.dataset.images,
                                                  self.dataset.extents, self.cache_file,
                                                  autocast=self.autocast, progress=tick,
                                                  cancel=cancel)
        finally:
            if bar is not None:
                bar.close()

    def resume_hint(self) -> str:
        """What an interrupted run kept and how to go on (the CLI's Ctrl-C message)."""
        if self.cache is None and self.config.phase == "segmote" and self.config.cache_embeddings:
            parts = parts_dir(self.cache_file)
            done = sum(int(b) - int(a) for a, b in (f.stem.split("_")[1:3]
                                                     for f in parts.glob("chunk_*.safetensors")))
            return (f"{done} of {self.dataset.num_slices} slices of the embedding pre-compute "
                    f"are saved in {parts}; rerun the same command to continue from there")
        if (self.ckpt_dir / STATE_FILE).is_file():
            return f"rerun the same command to resume from {self.ckpt_dir}"
        return "nothing was saved yet; rerun the same command to start again"

    # ----------------------------------------------------------------------------- loop
    def _normalized(self, pos: TrainPosition) -> TrainPosition:
        """A position at the end of an epoch is the start of the next one."""
        if pos.step >= self.steps_per_epoch:
            return TrainPosition(pos.epoch + 1, 0, pos.global_step)
        return pos

    def _include_base(self) -> bool | None:
        """Store SAM inside the model unless it is the untouched ``sam_checkpoint`` file (or
        LiteMedSAM's pinned package file): otherwise nothing else could rebuild it."""
        c = self.config
        if c.phase == "sam":
            return True
        if c.sam_checkpoint:
            return False
        return None if c.model.model_type == "lite_medsam" else True

    def _save(self) -> None:
        save_training_checkpoint(self.ckpt_dir, self.model, self.optimizer,
                                 self._normalized(self.position),
                                 config=self._config_dict(), summary=self.summary(),
                                 include_base=self._include_base())

    def summary(self) -> dict[str, Any]:
        return {"phase": self.config.phase, "data": self.dataset.summary(),
                "epochs": self.config.optim.epochs, "steps_per_epoch": self.steps_per_epoch,
                "batch_size": self.config.optim.batch_size}

    def _open_metrics(self):
        self.out.mkdir(parents=True, exist_ok=True)
        rows = []
        if self.position.global_step and self.metrics_csv.is_file():
            with self.metrics_csv.open(newline="") as f:
                rows = [r for r in csv.DictReader(f)
                        if int(r["global_step"]) < self.position.global_step]
        f = self.metrics_csv.open("w", newline="")
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        return f, writer

    def fit(self, *, max_steps: int | None = None, progress: ProgressCallback | None = None,
            cancel: CancelToken | None = None, show_progress: bool = True) -> TrainResult:
        """Train to the end of the schedule (or ``max_steps`` more steps, then checkpoint).

        Ctrl-C or ``cancel`` saves a resumable checkpoint and re-raises.
        """
        from tqdm.auto import tqdm

        start = time.perf_counter()
        if self.cache is None:
            self.prepare_cache(cancel=cancel, show_progress=show_progress)
        self.model.train()
        epochs, spe = self.config.optim.epochs, self.steps_per_epoch
        f, writer = self._open_metrics()
        bar = tqdm(total=self.total_steps, initial=self.position.global_step, unit="step",
                   disable=not show_progress, desc=f"train ({self.config.phase})")
        last_loss, ran, stopped = float("nan"), 0, False
        try:
            while self.position.epoch < epochs:
                epoch = self.position.epoch
                lr = lr_at_epoch(self.config, epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                while self.position.step < spe:
                    if max_steps is not None and ran >= max_steps:
                        stopped = True
                        break
                    last_loss = self._one_step(writer, lr)
                    ran += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.1e}")
                    if self.position.global_step % self.config.checkpoint_every == 0:
                        self._save()
                    if progress is not None:
                        progress(self.position.global_step, self.total_steps)
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                if stopped:
                    break
                self.position = TrainPosition(epoch + 1, 0, self.position.global_step)
                self._save()
                f.flush()
                log.info("epoch %d/%d done (lr %.2e, last loss %.4f)", epoch + 1, epochs, lr,
                         last_loss)
        except (KeyboardInterrupt, Cancelled):
            log.warning("interrupted at global step %d: saving a resumable checkpoint",
                        self.position.global_step)
            self._save()
            raise
        finally:
            bar.close()
            f.close()
        self._save()
        model_path = None
        if not stopped:
            model_path = save_segmote(self.model, self.out / "model.safetensors",
                                      include_base=self._include_base(),
                                      training=self.summary())
            log.info("wrote %s", model_path)
        return TrainResult(model_path, self.ckpt_dir, self.metrics_csv,
                           self._normalized(self.position), last_loss,
                           time.perf_counter() - start)

    def _one_step(self, writer: csv.DictWriter, lr: float) -> float:
        t0 = time.perf_counter()
        pos = self.position
        batch = self.sampler.sample(pos.global_step, self.total_steps)
        slice_ids = self.dataset.mask_slice[batch.mask_ids]
        masks = self._masks[torch.as_tensor(batch.mask_ids)]
        feats, masks = self._features(slice_ids, batch, masks)
        if batch.mode == "free_box":
            masks = teacher_masks(self.teacher, feats, batch.boxes,
                                  self.dataset.extents[slice_ids], self.dataset.image_size).cpu()
        torch.manual_seed(self.config.seed * 1_000_003 + pos.global_step)
        cuda = self.device.type == "cuda"
        if cuda:  # pinned, asynchronous, and uint8/bool over the bus (4x fewer bytes)
            masks = masks.pin_memory()
        target = masks.to(self.device, non_blocking=cuda).float()
        res = training_loss(self.model, feats, batch, target,
                            self.config.loss, phase=self.config.phase,
                            sam_aux=self.config.loss.sam_aux, autocast=self.autocast)
        loss = res.terms.total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # checked after backward (no host sync before it) but before any weight changes
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at global step {pos.global_step}")
        if self.config.optim.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        self.optimizer.step()
        self.position = TrainPosition(pos.epoch, pos.step + 1, pos.global_step + 1)
        t = res.terms  # one host sync for all logged numbers, after the step
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device)
                              for v in (loss.detach(), t.seg, t.dice, t.balance)]).tolist()
        writer.writerow({
            "epoch": pos.epoch, "step": pos.step, "global_step": pos.global_step, "lr": lr,
            "mode": batch.mode, "guide": batch.guide or "", "loss": f"{values[0]:.6f}",
            "seg": f"{values[1]:.6f}", "dice": f"{values[2]:.6f}",
            "balance": f"{values[3]:.6f}",
            "seconds": f"{time.perf_counter() - t0:.4f}"})
        return values[0]
