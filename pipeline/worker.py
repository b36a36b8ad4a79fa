"""The per-actor segmentation worker: loads the model once, segments batches of slices.

This module holds no Ray code: :mod:`pipeline.engine` wraps :class:`SegmentWorker` in a Ray
actor, and tests or the benchmark can call it in-process. Every batch returns a result row,
never an exception: an error in one batch (a slice the model cannot take, CUDA out of memory)
is reported with its case so the driver fails that case and the run goes on.
"""

from __future__ import annotations

import logging
import os
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ModelSpec", "SliceTask", "SliceBatchResult", "SegmentWorker", "peak_rss_mb",
           "WorkerPoisonedError", "NoCudaError", "check_auto_trained"]

log = logging.getLogger(__name__)

# Errors after which a CUDA context is unusable: every later kernel in the process fails too,
# so the actor must be replaced, not asked again.
_POISON_MARKERS = ("illegal memory access", "device-side assert", "cuda error: unspecified",
                   "misaligned address", "an illegal instruction", "cudnn_status_execution_failed",
                   "cublas_status_execution_failed", "uncorrectable ecc", "launch failure")


class WorkerPoisonedError(RuntimeError):
    """The worker's device is unusable from now on; the pool replaces the actor."""


class NoCudaError(RuntimeError):
    """A GPU was reserved for this worker but its torch cannot use CUDA."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model every actor loads (by path, so nothing large travels through Ray).

    Attributes:
        segmote_checkpoint: SegMoTE ``.safetensors``; ``None`` with no SAM checkpoint means the
            bundled demo model (``segmote_core.load_demo_model``).
        sam_checkpoint: official SAM ``.pth`` the SegMoTE weights sit on (or bare SAM).
        model_type: SAM size when only ``sam_checkpoint`` is given.
        precision: ``"auto"`` (bf16 autocast where the hardware computes bf16 natively:
            CUDA compute capability >= 8.0, CPUs with AVX512-BF16/AMX), ``"bf16"`` or ``"fp32"``.
        allow_other_base: load the SegMoTE weights on a SAM checkpoint whose sha256 differs
            from the one they record (``--allow-other-base``).
    """

    segmote_checkpoint: str | None = None
    sam_checkpoint: str | None = None
    model_type: str = "vit_b"
    precision: str = "auto"
    allow_other_base: bool = False

    def describe(self) -> str:
        if self.segmote_checkpoint:
            return f"SegMoTE {self.segmote_checkpoint}" + (
                f" on SAM {self.sam_checkpoint}" if self.sam_checkpoint else "")
        if self.sam_checkpoint:
            return f"bare SAM {self.model_type} {self.sam_checkpoint}"
        return "bundled demo model"

    def files(self) -> list[str]:
        """The model files the run reads (a checkpoint's JSON sidecar included)."""
        out = [f for f in (self.segmote_checkpoint, self.sam_checkpoint) if f]
        if self.segmote_checkpoint:
            out.append(str(Path(self.segmote_checkpoint).with_suffix(".json")))
        return out

    def check_files(self) -> None:
        """Fail early, on the driver, when a named file is missing (clear message)."""
        for flag, value in (("--segmote-checkpoint", self.segmote_checkpoint),
                            ("--sam-checkpoint", self.sam_checkpoint)):
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{flag} {value}: no such file")
        if self.segmote_checkpoint is None and self.sam_checkpoint is None:
            from segmote_core.build import demo_model_path  # imports torch: demo runs only

            if not demo_model_path().is_file():
                raise FileNotFoundError(
                    f"the bundled demo model is missing ({demo_model_path()}); pass "
                    "--segmote-checkpoint (and --sam-checkpoint) instead")


@dataclass
class SliceTask:
    """One batch of consecutive slices of one case.

    Attributes:
        slices: ``(B, Y, X)`` grey or ``(B, Y, X, 3)`` RGB, raw intensities.
        boxes: ``(B, 4)`` XYXY per slice (NaN rows: nothing there) or ``None`` for PPT auto mode.
        label_value: the id written where the mask is on.
        categories: names of the model's vocabulary: one PPT pass per category, resolved into
            one label map (values of the label table, ``segmote_core.categories``); empty: one
            binary PPT (or box) mask as ``label_value``.
    """

    case_id: str
    start: int
    slices: np.ndarray
    modality: str
    boxes: np.ndarray | None = None
    label_value: int = 1
    categories: tuple[str, ...] = ()


@dataclass
class SliceBatchResult:
    """The worker's answer for one :class:`SliceTask`; ``error`` set means the batch failed."""

    case_id: str
    start: int
    labels: np.ndarray | None        # (B, Y, X) uint8/uint16
    confidence: np.ndarray | None    # (B,) float32, NaN where no object / no experts
    expert: np.ndarray | None        # (B,) int16, -1 where none
    seconds: float = 0.0
    error: str | None = None
    worker: str = ""
    qc: dict[str, np.ndarray] | None = None  # decoder-side QC signals (segmote_core.qc)
    # per category (--categories): confidence, expert and its QC signals, each (B,)
    categories: dict[str, dict[str, np.ndarray]] | None = None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class SegmentWorker:
    """Loads the model once and segments :class:`SliceTask` batches.

    Args:
        spec: the model to load.
        threads: torch intra-op threads for this process (CPU work).
        use_gpu: put the model on CUDA; :class:`NoCudaError` when this torch cannot.
        chunk: slices per encoder call inside ``segment_batch``.
        poison_case: test hook (``SEGMOTE_TEST_POISON_CASE``): this case's batch acts as a
            CUDA illegal memory access, after which every call fails (as on a real GPU).
    """

    def __init__(self, spec: ModelSpec, *, threads: int = 1, use_gpu: bool = False,
                 chunk: int = 8, poison_case: str | None = None) -> None:
        import torch

        from segmote_core.build import load_model
        from segmote_core.device import configure_cuda

        torch.set_num_threads(max(1, int(threads)))
        if use_gpu and not torch.cuda.is_available():
            # Never a silent CPU fallback: the actor would hold its GPU reservation and run
            # one CPU thread, hours slower, with the warning lost in a worker log.
            raise NoCudaError(
                f"a GPU was reserved for worker {os.uname().nodename}:{os.getpid()} but its "
                f"torch {torch.__version__} cannot use CUDA (CUDA build: {torch.version.cuda}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a "
                f"CUDA build of torch on that node, or run with --gpus-per-actor 0")
        self.device = "cuda" if use_gpu else "cpu"
        if use_gpu:
            configure_cuda()
        self.poison_case = poison_case
        self._poisoned: str | None = None
        self.spec = spec
        self.chunk = max(1, int(chunk))
        self.model = load_model(spec.segmote_checkpoint, spec.sam_checkpoint,
                                model_type=spec.model_type, device=self.device,
                                allow_other_base=spec.allow_other_base)
        self.model.eval()
        self.name = f"{os.uname().nodename}:{os.getpid()}:{self.device}"

    def signature(self) -> dict[str, Any]:
        """The loaded model's signature (config + weight hash) and the precision it runs at."""
        from segmote_core.predictor import model_signature, use_bf16

        sig = model_signature(self.model)
        sig["bf16_encoder"] = bool(use_bf16(self.model, self.spec.precision))
        sig["device"] = self.model.device.type  # CPU and GPU labels differ by rounding
        return sig

    def info(self) -> dict[str, Any]:
        """Where this worker runs and its peak memory so far (MiB)."""
        return {"worker": self.name, "device": self.device, "pid": os.getpid(),
                "peak_rss_mb": peak_rss_mb()}

    def __call__(self, task: SliceTask) -> SliceBatchResult:
        """Segment one batch; any exception becomes ``SliceBatchResult.error`` naming the case."""
        from segmote_core.qc import segment_with_qc

        t0 = time.perf_counter()
        if self._poisoned:
            raise WorkerPoisonedError(self._poisoned)
        try:
            if self.poison_case is not None and task.case_id == self.poison_case:
                self._poisoned = ("CUDA error: an illegal memory access was encountered "
                                  "(injected by SEGMOTE_TEST_POISON_CASE)")
                raise WorkerPoisonedError(self._poisoned)
            slices = np.asarray(task.slices)
            if slices.ndim not in (3, 4) or (slices.ndim == 4 and slices.shape[-1] != 3):
                raise ValueError(f"slices of shape {slices.shape} are not (B, Y, X) or (B, Y, X, 3)")
            # A slice without any finite value (all NaN) holds no image: it is left empty
            # (no mask, no confidence) rather than segmented, as docs/medical_io.md says.
            flat = slices.reshape(len(slices), -1)
            keep = np.flatnonzero(np.isfinite(flat).any(axis=1)) if flat.dtype.kind == "f" \
                else np.arange(len(slices))
            masks = np.zeros((len(slices), *slices.shape[1:3]), bool)
            conf = np.full(len(slices), np.nan, np.float32)
            expert = np.full(len(slices), -1, np.int16)
            qc: dict[str, np.ndarray] = {}
            if task.categories:
                return self._categories(task, slices, keep, t0)
            if len(keep):
                res, signals = segment_with_qc(
                    self.model, slices[keep], task.modality,
                    boxes=None if task.boxes is None else np.asarray(task.boxes)[keep],
                    precision=self.spec.precision, chunk=self.chunk)
                masks[keep], conf[keep], expert[keep] = res.masks, res.confidence, res.expert
                for name, values in signals.as_dict().items():
                    values = np.asarray(values)
                    qc[name] = np.full(len(slices), 0 if name == "area" else np.nan,
                                       np.result_type(values.dtype, np.float32))
                    qc[name][keep] = values
            dtype = np.uint8 if task.label_value <= 255 else np.uint16
            labels = masks.astype(dtype) * dtype(task.label_value)
            return SliceBatchResult(task.case_id, task.start, labels, conf, expert,
                                    time.perf_counter() - t0, None, self.name, qc)
        except WorkerPoisonedError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per case, never raised
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            if _is_poisoning(exc):
                self._poisoned = f"{self.name}: {detail}"
                raise WorkerPoisonedError(self._poisoned) from exc
            if _is_oom(exc):
                detail = f"out of memory on {self.device}: {detail} (try a smaller --batch-size)"
                _free_cuda()
            log.warning("case %s slices %d..: %s", task.case_id, task.start, detail)
            return SliceBatchResult(task.case_id, task.start, None, None, None,
                               time.perf_counter() - t0,
                               f"slices {task.start}-{task.start + len(task.slices) - 1}: "
                               f"{detail}", self.name)


    def _categories(self, task: SliceTask, slices: np.ndarray, keep: np.ndarray,
                    t0: float) -> SliceBatchResult:
        """One PPT pass per category on one embedding per slice, resolved into one label map;
        the slice-level confidence is the mean over the categories found on the slice and the
        slice-level expert the one of its largest category."""
        from segmote_core.categories import segment_categories

        b, k = len(slices), len(task.categories)
        dtype = np.uint8 if k <= 255 else np.uint16
        labels = np.zeros((b, *slices.shape[1:3]), dtype)
        per = {c: {"confidence": np.full(b, np.nan, np.float32),
                   "expert": np.full(b, -1, np.int16),
                   **{s: np.full(b, np.nan if s != "area" else 0.0, np.float32)
                      for s in ("iou_head", "stability", "reprompt", "area")}}
               for c in task.categories}
        if len(keep):
            res = segment_categories(self.model, slices[keep], task.categories, task.modality,
                                     precision=self.spec.precision, chunk=self.chunk)
            labels[keep] = res.labels
            for j, c in enumerate(task.categories):
                per[c]["confidence"][keep] = res.confidence[j]
                per[c]["expert"][keep] = res.expert[j]
                for name, values in res.signals[j].items():
                    per[c][name][keep] = values
        area = np.stack([per[c]["area"] for c in task.categories])            # (K, B)
        found = area > 0
        conf_k = np.stack([per[c]["confidence"] for c in task.categories])
        rated = found & np.isfinite(conf_k)
        conf = np.where(rated.any(0), np.where(rated, conf_k, 0).sum(0)
                        / np.maximum(rated.sum(0), 1), np.nan).astype(np.float32)
        largest = area.argmax(0)
        expert = np.where(found.any(0), np.stack([per[c]["expert"] for c in task.categories])
                          [largest, np.arange(b)], -1).astype(np.int16)
        return SliceBatchResult(task.case_id, task.start, labels, conf, expert,
                                time.perf_counter() - t0, None, self.name, None, per)


def _is_poisoning(exc: BaseException) -> bool:
    text = str(exc).lower()
    return not _is_oom(exc) and any(m in text for m in _POISON_MARKERS)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def check_auto_trained(spec: ModelSpec) -> None:
    """Refuse prompt-free mode for a model whose PPT was never trained, from its files alone,
    before Ray and the model start (random PPT queries would segment noise and report it done).

    Raises:
        ValueError: saying to use ``--mode box`` or to train first.
    """
    from segmote_core.trained import auto_refusal

    if spec.segmote_checkpoint:
        from segmote_core.checkpoint import read_checkpoint_info
        from segmote_core.config import SegMoTEConfig
        from segmote_core.trained import recorded_parts

        info = read_checkpoint_info(spec.segmote_checkpoint)
        config = SegMoTEConfig.from_dict(info["config"])
        reason = auto_refusal(config.use_ppt, recorded_parts(info, config),
                              str(spec.segmote_checkpoint))
    elif spec.sam_checkpoint or spec.model_type == "lite_medsam":
        reason = auto_refusal(False, set(), spec.sam_checkpoint or spec.model_type)
    else:
        reason = None  # the bundled demo model: trained
    if reason:
        raise ValueError(reason)
