"""3D segmentation: prompt propagation through a volume, and slice-wise PPT auto-segmentation.

Propagation (micro-sam / MedSAM style): the user prompts one or more slices; the mask found on
slice ``z`` gives the prompt of slices ``z + 1`` and ``z - 1`` (its bounding box widened by
``box_margin`` pixels, and a positive point at its innermost pixel), and so on outwards.

Stopping rule, checked on each propagated slice's mask against the previous slice's mask; the
slice that fails is left empty and that direction ends:

1. ``"empty"``: the mask has fewer than ``min_area`` pixels (the object has ended);
2. ``"no_overlap"``: under ``min_overlap`` of the smaller of the two masks is shared (the
   prediction jumped to another structure: adjacent slices of one object overlap);
3. ``"leak"``: the mask is more than ``max_area_ratio`` times the previous one's area;
4. ``"low_score"``: the predicted quality score is below ``min_score``;
5. ``"edge"`` / ``"max_slices"``: the volume (or the allowed distance) ends;
6. ``"met"``: the next slice belongs to another prompted slice: with several prompted slices each
   slice between two of them is propagated from the nearer one (ties go to the lower slice); a
   prompted slice whose own mask is empty claims no part of a gap (its neighbours propagate up
   to it), and no prompted slice is ever segmented again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .geometry import expand_box, interior_point, mask_to_box
from .io.image import array_of
from .progress import CancelToken, ProgressCallback, report

__all__ = ["SlicePrompt", "SliceSegmentation", "SliceSegmenter", "PredictorSegmenter",
           "PropagationConfig", "PropagationResult", "StopEvent", "prompt_from_mask",
           "propagate", "VolumeResult", "segment_volume_auto"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlicePrompt:
    """Prompts of one slice, in its pixels: ``box`` (4,) XYXY; ``points`` (P, 2) XY with
    ``labels`` (P,) 1 = foreground, 0 = background; ``mask_input`` (1, h4, w4) low-res logits."""

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.box is None and self.points is None and self.mask_input is None:
            raise ValueError("a slice prompt needs a box, points or a mask input")
        if self.points is not None and (self.labels is None or
                                        len(np.asarray(self.points).reshape(-1, 2)) !=
                                        len(np.asarray(self.labels).reshape(-1))):
            raise ValueError("points need one label each")


@dataclass
class SliceSegmentation:
    """One slice's prediction: ``mask`` (Y, X) bool, ``score`` (quality), optional logits."""

    mask: np.ndarray
    score: float = 1.0
    low_res_logits: np.ndarray | None = None


class SliceSegmenter(Protocol):
    """What :func:`propagate` needs: the volume's size and a 2D prompt -> mask step."""

    n_slices: int
    shape: tuple[int, int]

    def segment(self, z: int, prompt: SlicePrompt) -> SliceSegmentation: ...


class PredictorSegmenter:
    """:class:`SliceSegmenter` over a :class:`~segmote_core.predictor.SegMoTEPredictor`.

    Args:
        predictor: its current image is replaced slice by slice.
        volume: ``(Z, Y, X)`` array-like (numpy, dask, zarr) or a ``MedicalImage``.
        cache: an :class:`~segmote_core.cache.EmbeddingCache` (or anything with ``get``/``put``):
            embeddings found there skip the encoder, new ones are stored.
    Raises:
        EmbeddingCacheMismatchError: ``cache`` is signed for another model, modality or window.
    """

    def __init__(self, predictor: Any, volume: Any, modality: str = "auto", window: Any = None,
                 cache: Any = None) -> None:
        self.predictor, self.modality, self.window, self.cache = predictor, modality, window, cache
        self.data = array_of(volume)
        if len(self.data.shape) != 3:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {tuple(self.data.shape)}")
        self.n_slices = int(self.data.shape[0])
        self.shape = (int(self.data.shape[1]), int(self.data.shape[2]))
        self._current: int | None = None
        if cache is not None and hasattr(cache, "check_compatible"):
            # never fill a signed cache with embeddings of another model or normalisation
            cache.check_compatible(predictor, modality, window)

    def _set_slice(self, z: int) -> None:
        if self._current == z:
            return
        emb = self.cache.get(z) if self.cache is not None else None
        if emb is not None:
            self.predictor.set_embedding(emb)
        else:
            self.predictor.set_image(np.asarray(self.data[z]), modality=self.modality,
                                     window=self.window)
            if self.cache is not None:  # go on with what the cache keeps: same masks on reuse
                stored = self.cache.put(z, self.predictor.get_embedding())
                if isinstance(stored, dict):
                    self.predictor.set_embedding(stored)
        self._current = z

    def segment(self, z: int, prompt: SlicePrompt) -> SliceSegmentation:
        self._set_slice(int(z))
        pred = self.predictor.predict(point_coords=prompt.points, point_labels=prompt.labels,
                                      box=prompt.box, mask_input=prompt.mask_input)
        return SliceSegmentation(pred.masks[0].astype(bool), float(pred.scores[0]),
                           pred.low_res_logits[:1])


def prompt_from_mask(mask: np.ndarray, box_margin: int = 2, use_points: bool = True,
                     logits: np.ndarray | None = None) -> SlicePrompt | None:
    """The prompt a (Y, X) mask gives its neighbour slices: bounding box widened by
    ``box_margin`` px (clipped to the image) and a positive point at the pixel farthest from the
    mask's border; ``logits`` (1, h4, w4) are passed on as the mask input. ``None`` if empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    box = expand_box(mask_to_box(mask), box_margin, mask.shape)
    points = labels = None
    if use_points:
        points, labels = interior_point(mask)[None], np.array([1], dtype=np.int64)
    return SlicePrompt(box=box, points=points, labels=labels, mask_input=logits)


@dataclass(frozen=True)
class PropagationConfig:
    """Knobs of the prompt derivation and the stopping rule (module docstring)."""

    box_margin: int = 2
    use_points: bool = True
    use_mask_input: bool = False
    min_area: int = 10
    min_overlap: float = 0.2
    max_area_ratio: float | None = 4.0
    min_score: float | None = None
    max_slices: int | None = None

    def __post_init__(self) -> None:
        if self.box_margin < 0 or self.min_area < 1 or not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"invalid propagation config {self}")


@dataclass(frozen=True)
class StopEvent:
    """Where a propagation direction ended: it started at ``start``, moved by ``step`` (+1 / -1),
    and stopped before segmenting (or rejecting) slice ``z``, for ``reason``."""

    start: int
    step: int
    z: int
    reason: str


@dataclass
class PropagationResult:
    mask: np.ndarray                  # (Z, Y, X) bool
    scores: np.ndarray                # (Z,) float32, NaN where not segmented
    source: np.ndarray                # (Z,) int32: the prompted slice each came from, -1 none
    prompts: dict[int, SlicePrompt] = field(default_factory=dict)   # prompt used per slice
    stops: list[StopEvent] = field(default_factory=list)

    @property
    def slices(self) -> list[int]:
        """Slices with a (non-empty) mask, sorted."""
        return [int(z) for z in np.flatnonzero(self.mask.reshape(len(self.mask), -1).any(1))]


def _stop_reason(mask: np.ndarray, prev: np.ndarray, score: float,
                 cfg: PropagationConfig) -> str | None:
    area, prev_area = int(mask.sum()), int(prev.sum())
    if area < cfg.min_area:
        return "empty"
    shared = int(np.logical_and(mask, prev).sum())
    if shared < cfg.min_overlap * min(area, prev_area):
        return "no_overlap"
    if cfg.max_area_ratio is not None and area > cfg.max_area_ratio * prev_area:
        return "leak"
    if cfg.min_score is not None and score < cfg.min_score:
        return "low_score"
    return None


def propagate(segmenter: SliceSegmenter, prompts: dict[int, SlicePrompt],
              config: PropagationConfig | None = None, progress: ProgressCallback | None = None,
              cancel: CancelToken | None = None) -> PropagationResult:
    """Segment the prompted slices, then propagate each outwards (module docstring).

    Args:
        segmenter: e.g. :class:`PredictorSegmenter`.
        prompts: slice index -> :class:`SlicePrompt` given by the user.
        progress: ``progress(done, total)`` over the slices of the volume.
    Returns:
        :class:`PropagationResult` with the ``(Z, Y, X)`` mask.
    """
    cfg = config or PropagationConfig()
    n, (h, w) = segmenter.n_slices, segmenter.shape
    if not prompts:
        raise ValueError("propagation needs at least one prompted slice")
    bad = [z for z in prompts if not 0 <= int(z) < n]
    if bad:
        raise ValueError(f"prompted slices {bad} outside the volume's 0..{n - 1}")
    res = PropagationResult(np.zeros((n, h, w), bool), np.full(n, np.nan, np.float32),
                            np.full(n, -1, np.int32))
    starts = sorted(int(z) for z in prompts)
    seeds: dict[int, SliceSegmentation] = {}
    done = 0
    for z in starts:
        out = segmenter.segment(z, prompts[z])
        res.prompts[z] = prompts[z]
        seeds[z] = out
        if out.mask.any():
            res.mask[z], res.scores[z], res.source[z] = out.mask, out.score, z
        done += 1
        report(progress, done, n, cancel)
    # seeds whose own mask is empty propagate nothing, so they do not claim half of a gap
    live = [z for z in starts if int(seeds[z].mask.sum()) >= cfg.min_area]
    for z0 in starts:
        below = [z for z in live if z < z0]
        above = [z for z in live if z > z0]
        lo = 0 if not below else (below[-1] + z0) // 2 + 1     # lower half of the gap is z0's
        hi = n - 1 if not above else (z0 + above[0]) // 2
        lo = max([lo] + [z + 1 for z in starts if z < z0])      # never past a prompted slice
        hi = min([hi] + [z - 1 for z in starts if z > z0])
        for step, limit in ((-1, lo), (1, hi)):
            prev = seeds[z0]
            if int(prev.mask.sum()) < cfg.min_area:
                res.stops.append(StopEvent(z0, step, z0, "empty"))
                continue
            z = z0
            while True:
                nz = z + step
                if nz < 0 or nz >= n:
                    res.stops.append(StopEvent(z0, step, nz, "edge"))
                    break
                if (nz < limit if step < 0 else nz > limit):
                    res.stops.append(StopEvent(z0, step, nz, "met"))
                    break
                if cfg.max_slices is not None and abs(nz - z0) > cfg.max_slices:
                    res.stops.append(StopEvent(z0, step, nz, "max_slices"))
                    break
                prompt = prompt_from_mask(prev.mask, cfg.box_margin, cfg.use_points,
                                          prev.low_res_logits if cfg.use_mask_input else None)
                out = segmenter.segment(nz, prompt)
                reason = _stop_reason(np.asarray(out.mask, bool), prev.mask, out.score, cfg)
                res.prompts[nz] = prompt
                if reason is not None:
                    res.stops.append(StopEvent(z0, step, nz, reason))
                    break
                res.mask[nz], res.scores[nz], res.source[nz] = out.mask, out.score, z0
                prev, z = out, nz
                done += 1
                report(progress, min(done, n), n, cancel)
    log.info("propagated from slices %s: %d slice(s) segmented; stops %s", starts,
             len(res.slices), [(s.start, s.step, s.z, s.reason) for s in res.stops])
    report(progress, n, n, cancel)
    return res


@dataclass
class VolumeResult:
    labels: Any               # (Z, Y, X) uint8 (numpy, or the ``out`` array given)
    confidence: np.ndarray    # (Z,) float32 router confidence (NaN: none)
    expert: np.ndarray        # (Z,) int16 selected expert (-1: none)
    score: np.ndarray         # (Z,) float32 mask quality (NaN: slice not segmented)
    token: np.ndarray | None = None   # (Z,) int16 selected expert token (-1: none)


def segment_volume_auto(model: Any, volume: Any, modality: str = "auto", *, window: Any = None,
                        chunk: int = 8, out: Any = None, precision: str = "auto",
                        slices: Any = None, embeddings: Any = None,
                        progress: ProgressCallback | None = None,
                        cancel: CancelToken | None = None,
                        text: str | None = None) -> VolumeResult:
    """PPT (prompt-free) segmentation of every slice, reading ``chunk`` slices at a time.

    Args:
        model: a :class:`~segmote_core.modeling.SegMoTE` with PPT.
        volume: ``(Z, Y, X)`` (or ``(Z, Y, X, 3)`` RGB) array-like (numpy, dask, zarr) or a
            ``MedicalImage``.
        out: optional ``(Z, Y, X)`` array to write into (e.g. a zarr array: memory stays
            ``chunk`` slices); default a new uint8 numpy array.
        slices: the slice indices to segment (default all); the others of ``out`` are left
            alone and their scores stay NaN.
        embeddings: an :class:`~segmote_core.embeddings.EmbeddingStore` (anything with
            ``get(z)`` / ``put(z, embedding)``): slices found there skip the encoder, the others
            are encoded (as ``embed_slices``) and stored.
        text: a category of the model's vocabulary: PPT segments that category (its text
            token beside the PPT tokens, docs/model.md); ``None``: the paper's PPT.
    """
    from .inference import decode_auto, embed_slices, segment_batch, stack_embeddings
    from .predictor import use_bf16

    data = array_of(volume)
    shape = tuple(int(s) for s in data.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] == 3)):
        raise ValueError(f"expected a (Z, Y, X) or (Z, Y, X, 3) volume, got shape {shape}")
    n = shape[0]
    zs = list(range(n)) if slices is None else [int(z) for z in slices]
    if any(not 0 <= z < n for z in zs):
        raise ValueError(f"slices {zs} outside the volume's 0..{n - 1}")
    if out is None:
        out = np.zeros(shape[:3], np.uint8)
    elif tuple(out.shape) != shape[:3]:
        raise ValueError(f"out has shape {tuple(out.shape)}, the volume {shape[:3]}")
    conf = np.full(n, np.nan, np.float32)
    expert = np.full(n, -1, np.int16)
    token = np.full(n, -1, np.int16)
    score = np.full(n, np.nan, np.float32)
    bf16 = use_bf16(model, precision)
    for start in range(0, len(zs), chunk):
        part = zs[start:start + chunk]
        if embeddings is None:
            res = segment_batch(model, np.stack([np.asarray(data[z]) for z in part]),
                                modality=modality, window=window, chunk=chunk,
                                precision=precision, text=text)
        else:
            found = {z: embeddings.get(z) for z in part}
            missing = [z for z, e in found.items() if e is None]
            for batch in embed_slices(model, lambda z: np.asarray(data[z]), missing, modality,
                                      window, bf16=bf16, batch=chunk):
                for z, emb in batch:
                    embeddings.put(z, emb)
                    found[z] = emb
            res = decode_auto(model, *stack_embeddings(model, [found[z] for z in part]),
                              text=text)
        masks = res.masks.astype(np.uint8)
        if part == list(range(part[0], part[-1] + 1)):
            out[part[0]:part[-1] + 1] = masks
        else:
            for i, z in enumerate(part):
                out[z] = masks[i]
        conf[part], expert[part], token[part], score[part] = (res.confidence, res.expert,
                                                              res.token, res.score)
        report(progress, start + len(part), len(zs), cancel)
    return VolumeResult(out, conf, expert, score, token)
