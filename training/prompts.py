"""Training prompts drawn from the ground truth (docs/model.md).

Each step draws one prompt mode for its whole batch (box 0.4 / points 0.3 / auto 0.3 by default):

- ``box``: the mask's bounding box, each side jittered by up to ``box_jitter`` of its size.
- ``points``: 1..``max_pos_points`` positive points inside the mask and 0..``max_neg_points``
  negative points in the background near it, padded with label -1 (SAM's "not a point").
- ``auto``: PPT tokens only, drawn from PPT-eligible (binary) masks. With the progressive guide
  probability ``p(step) = ppt_guide_start * max(0, 1 - step / (ppt_guide_until * total))`` the step
  is guided: even steps give the category's text token, odd steps the previous round's low-res
  logits as the mask prompt (the trainer runs that first round).
- ``auto`` *category-conditioned* (``ppt_category_text`` > 0, this project's extension): that share
  of the auto steps draws from every mask (multi-category datasets too), each with its category's
  text token on every step to the end; guided steps add only the mask prompt. A share
  ``ppt_absent`` of the items asks for a category of the slice's dataset that the slice does not
  hold, with an empty target.

- ``free_box`` (``p_free_box`` > 0, drawn before the other modes): a box of 15-50 % of each
  side centred on a body pixel of the slice (:func:`body_boxes`), whatever lies there; the
  trainer takes the frozen base model's mask for it as the target (distillation), so the model
  keeps following boxes on anatomy the labels never name.

Box and point batches carry the category's text token with probability ``text_with_prompt``; a
mask whose box alone is ambiguous (a category that shares its slice with others of its dataset)
only appears in batches with text. Randomness comes from ``numpy.random.default_rng((seed, step))``
so a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from segmote_core.geometry import mask_to_box, masks_to_boxes

from .dataset import SliceDataset
from .train_config import PromptConfig

__all__ = ["PromptBatch", "PromptSampler", "mask_boxes", "jitter_boxes", "sample_points",
           "guide_probability", "body_boxes"]

MODES = ("box", "points", "auto")


@dataclass
class PromptBatch:
    """Prompts for B masks, in the model-input frame (pixels of S x S).

    Attributes:
        mask_ids: (B,) indices into the dataset's masks.
        mode: ``"box" | "points" | "auto" | "free_box"`` (free boxes: targets come from the
            frozen base model, not from ``mask_ids``, which only name the slices).
        boxes: (B, 4) float32 XYXY, or None.
        point_coords: (B, P, 2) float32 XY, or None; point_labels (B, P) int64 (1, 0, -1 pad).
        text_ids: (B,) int64 vocabulary indices, or None.
        guide: ``None`` | ``"text"`` | ``"mask"`` (auto mode only).
        category: a category-conditioned PPT step (the text token is the question, not a guide).
        empty: (B,) bool, items whose target is empty (a category the slice lacks), or None.
    """

    mask_ids: np.ndarray
    mode: str
    boxes: np.ndarray | None = None
    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    text_ids: np.ndarray | None = None
    guide: str | None = None
    category: bool = False
    empty: np.ndarray | None = None


def body_boxes(gray: np.ndarray, n: int, rng: np.random.Generator,
               extent: tuple[int, int] | None = None) -> np.ndarray:
    """(n, 4) float32 XYXY boxes of 15-50 % of each side, each centred on a body pixel.

    Args:
        gray: (H, W) intensities scaled to 0..255; body = above 10 % (not air); an image
            without body pixels takes any pixel.
        extent: (h, w) of the image inside a padded square (``None``: all of ``gray``).
    """
    h, w = gray.shape[:2] if extent is None else (int(extent[0]), int(extent[1]))
    ys, xs = np.nonzero(gray[:h, :w] > 0.1 * 255)
    if ys.size == 0:
        ys, xs = np.nonzero(np.ones((h, w), bool))
    boxes = []
    for _ in range(n):
        i = rng.integers(ys.size)
        bw, bh = rng.uniform(0.15, 0.5) * w, rng.uniform(0.15, 0.5) * h
        x0 = np.clip(xs[i] - bw / 2, 0, w - 1)
        y0 = np.clip(ys[i] - bh / 2, 0, h - 1)
        boxes.append([x0, y0, min(x0 + bw, w - 1), min(y0 + bh, h - 1)])
    return np.round(np.asarray(boxes, np.float32).reshape(n, 4))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) bool -> (M, 4) float32 inclusive XYXY boxes (:mod:`segmote_core.geometry`);
    an empty mask gives ``0, 0, 0, 0`` as in SAM's own ``batched_mask_to_box``."""
    return masks_to_boxes(masks, empty=0.0)


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, fraction: float,
                 limit: np.ndarray | float) -> np.ndarray:
    """Move each side of (B, 4) XYXY boxes by U(-f, f) * side length; clip to [0, limit - 1].

    ``limit`` is the image side S, or (B, 2) per-box (h, w) extents.
    """
    boxes = np.asarray(boxes, np.float32)
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1) + 1.0
    out = boxes + rng.uniform(-fraction, fraction, boxes.shape).astype(np.float32) * size
    lim = np.asarray(limit, np.float32)
    if lim.ndim == 0:
        hi = np.full((boxes.shape[0], 4), float(lim) - 1, np.float32)
    else:
        hi = np.concatenate([lim[:, ::-1], lim[:, ::-1]], axis=1).astype(np.float32) - 1
    out = np.clip(out, 0, hi)
    x0, x1 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
    y0, y1 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
    return np.stack([x0, y0, x1, y1], axis=1)


def sample_points(mask: np.ndarray, rng: np.random.Generator, n_pos: int, n_neg: int,
                  extent: tuple[int, int] | None = None, margin: float = 0.2
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Random points of one (H, W) bool mask.

    Positives are uniform over the mask; negatives uniform over the background inside the mask's
    box grown by ``margin`` of its size (anywhere in ``extent`` when that is empty).

    Returns:
        coords (n_pos + n_neg, 2) float32 XY, labels (n_pos + n_neg,) int64 (1 fg, 0 bg).
    """
    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("cannot draw points from an empty mask")
    pick = rng.integers(0, ys.size, n_pos)
    coords = [np.stack([xs[pick], ys[pick]], 1)]
    labels = [np.ones(n_pos, np.int64)]
    if n_neg:
        h, w = extent if extent is not None else mask.shape
        x0, y0, x1, y1 = (int(v) for v in mask_to_box(mask))  # inclusive max
        dy, dx = int((y1 - y0 + 1) * margin) + 1, int((x1 - x0 + 1) * margin) + 1
        region = np.zeros_like(mask)
        region[max(y0 - dy, 0):min(y1 + dy + 1, h), max(x0 - dx, 0):min(x1 + dx + 1, w)] = True
        ny, nx = np.nonzero(region & ~mask)
        if ny.size == 0:
            valid = np.zeros_like(mask)
            valid[:h, :w] = True
            ny, nx = np.nonzero(valid & ~mask)
        if ny.size:
            pick = rng.integers(0, ny.size, n_neg)
            coords.append(np.stack([nx[pick], ny[pick]], 1))
            labels.append(np.zeros(n_neg, np.int64))
    return np.concatenate(coords).astype(np.float32), np.concatenate(labels)


def guide_probability(step: int, total_steps: int, start: float, until: float) -> float:
    """PPT's guided-step probability: ``start`` decaying linearly to 0 at ``until * total``."""
    end = until * total_steps
    if end <= 0:
        return 0.0
    return float(start * max(0.0, 1.0 - step / end))


class PromptSampler:
    """Draws batches of masks and their prompts from a :class:`SliceDataset`.

    Args:
        dataset: the training slices.
        config: prompt probabilities and limits.
        batch_size: B.
        vocabulary: the model's text vocabulary (category -> index); empty: no text tokens.
        use_auto: the model has PPT (else auto steps are redistributed to box/points).
        balance_datasets: draw the dataset uniformly, then a mask of it.
        category_weights: relative weight of each category's masks in the draw (others 1.0).
        masks_per_slice: each drawn mask brings up to this many - 1 other masks of its slice
            (same pool), so one encoder pass supervises several masks (end-to-end phase).
        seed: base seed; step ``s`` uses ``default_rng((seed, s))``.
    """

    def __init__(self, dataset: SliceDataset, config: PromptConfig, *, batch_size: int,
                 vocabulary: tuple[str, ...] = (), use_auto: bool = True,
                 balance_datasets: bool = True, masks_per_slice: int = 1,
                 category_weights: Mapping[str, float] | None = None, seed: int = 0) -> None:
        self.ds = dataset
        self.cfg = config
        self.batch_size = batch_size
        self.seed = seed
        self.balance = balance_datasets
        if masks_per_slice < 1:
            raise ValueError(f"masks_per_slice must be >= 1, got {masks_per_slice}")
        self.masks_per_slice = masks_per_slice
        self.text_index = {name: i for i, name in enumerate(vocabulary)}
        self.use_text = bool(vocabulary)
        if self.use_text:
            unknown = sorted(set(dataset.categories) - set(self.text_index))
            if unknown:
                raise ValueError(f"categories {unknown} of {dataset.source} are not in the model's "
                                 f"vocabulary {list(vocabulary)}")
        self.boxes = mask_boxes(dataset.masks)
        weights = dict(category_weights or {})
        unknown = sorted(set(weights) - set(dataset.categories))
        if unknown:
            raise ValueError(f"category_weights names {unknown}, which {dataset.source} does not "
                             f"have; its categories: {sorted(set(dataset.categories))}")
        self.mask_weight = (np.array([weights.get(c, 1.0) for c in dataset.categories], float)
                            if weights else None)
        self.mask_dataset = np.array([dataset.datasets[s] for s in dataset.mask_slice])
        all_ids = np.arange(dataset.num_masks)
        self.pools = {
            "text": all_ids,
            "plain": all_ids[~dataset.needs_text] if self.use_text else all_ids,
            "auto": all_ids[dataset.binary],
        }
        # per slice, the categories its dataset has and it lacks (category-conditioned PPT)
        self.absent = self._absent_categories() if self.use_text else {}
        probs = np.array([config.p_box, config.p_points,
                          config.p_auto if (use_auto and self.pools["auto"].size) else 0.0])
        self.mode_probs = probs / probs.sum()

    def _pick(self, pool: np.ndarray, rng: np.random.Generator, n: int | None = None):
        if self.mask_weight is None:
            return rng.choice(pool, n)
        w = self.mask_weight[pool]
        return rng.choice(pool, n, p=w / w.sum())

    def _draw(self, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        per = self.masks_per_slice
        n = -(-self.batch_size // per)
        if not self.balance:
            anchors = self._pick(pool, rng, n)
        else:
            names = self.mask_dataset[pool]
            groups = [pool[names == g] for g in np.unique(names)]
            anchors = np.array([self._pick(groups[g], rng)
                                for g in rng.integers(0, len(groups), n)])
        if per == 1:
            return anchors
        slice_of = self.ds.mask_slice
        out: list[int] = []
        for a in anchors:
            same = pool[(slice_of[pool] == slice_of[a]) & (pool != a)]
            out += [int(a), *rng.permutation(same)[:per - 1].tolist()]
        return np.array(out[:self.batch_size])

    def sample(self, step: int, total_steps: int) -> PromptBatch:
        """The prompts of optimiser step ``step`` (of ``total_steps``)."""
        rng = np.random.default_rng((self.seed, step))
        if self.cfg.p_free_box > 0 and rng.random() < self.cfg.p_free_box:
            return self._free_box_step(rng)
        mode = MODES[int(rng.choice(3, p=self.mode_probs))]
        if mode == "auto" and self.use_text and self.cfg.ppt_category_text > 0 \
                and rng.random() < self.cfg.ppt_category_text:
            return self._category_step(step, total_steps, rng)
        if mode == "auto":
            ids = self._draw(self.pools["auto"], rng)
            guided = rng.random() < guide_probability(step, total_steps, self.cfg.ppt_guide_start,
                                                      self.cfg.ppt_guide_until)
            guide = None
            if guided:
                guide = "text" if (self.use_text and step % 2 == 0) else "mask"
            text = self._text(ids) if guide == "text" else None
            return PromptBatch(mask_ids=ids, mode="auto", text_ids=text, guide=guide)
        with_text = self.use_text and (rng.random() < self.cfg.text_with_prompt
                                       or self.pools["plain"].size == 0)
        ids = self._draw(self.pools["text" if with_text else "plain"], rng)
        batch = PromptBatch(mask_ids=ids, mode=mode, text_ids=self._text(ids) if with_text else None)
        extents = self.ds.extents[self.ds.mask_slice[ids]]
        if mode == "box":
            batch.boxes = jitter_boxes(self.boxes[ids], rng, self.cfg.box_jitter, extents)
        else:
            n_pts = self.cfg.max_pos_points + self.cfg.max_neg_points
            coords = np.zeros((len(ids), n_pts, 2), np.float32)
            labels = np.full((len(ids), n_pts), -1, np.int64)
            for row, m in enumerate(ids):
                n_pos = int(rng.integers(1, self.cfg.max_pos_points + 1))
                n_neg = int(rng.integers(0, self.cfg.max_neg_points + 1))
                c, lab = sample_points(self.ds.masks[m], rng, n_pos, n_neg,
                                       extent=tuple(extents[row]))
                coords[row, :len(lab)] = c
                labels[row, :len(lab)] = lab
            batch.point_coords, batch.point_labels = coords, labels
        return batch

    def _free_box_step(self, rng: np.random.Generator) -> PromptBatch:
        """Boxes anywhere on the body of the drawn masks' slices (targets: the base model)."""
        ids = self._draw(self.pools["text"], rng)
        boxes = np.zeros((len(ids), 4), np.float32)
        for row, m in enumerate(ids):
            s = int(self.ds.mask_slice[m])
            boxes[row] = body_boxes(self.ds.images[s].mean(0), 1, rng, self.ds.extents[s])[0]
        return PromptBatch(mask_ids=ids, mode="free_box", boxes=boxes)

    def _absent_categories(self) -> dict[int, list[str]]:
        """Slice -> sorted categories of its dataset (multi-category masks only) it lacks."""
        ds = self.ds
        per_dataset: dict[str, set[str]] = {}
        present: dict[int, set[str]] = {}
        for m, cat in enumerate(ds.categories):
            s = int(ds.mask_slice[m])
            present.setdefault(s, set()).add(cat)
            if ds.needs_text[m]:
                per_dataset.setdefault(ds.datasets[s], set()).add(cat)
        return {s: sorted(per_dataset.get(ds.datasets[s], set()) - cats)
                for s, cats in present.items()}

    def _category_step(self, step: int, total_steps: int, rng: np.random.Generator
                       ) -> PromptBatch:
        """A category-conditioned PPT step: any mask, its category's text token always; the
        mask guide on the progressive schedule; some items ask for an absent category."""
        ids = self._draw(self.pools["text"], rng)
        guided = rng.random() < guide_probability(step, total_steps, self.cfg.ppt_guide_start,
                                                  self.cfg.ppt_guide_until)
        text = self._text(ids)
        empty = np.zeros(len(ids), bool)
        swap = rng.random(len(ids)) < self.cfg.ppt_absent
        for row, m in enumerate(ids):
            lacking = self.absent.get(int(self.ds.mask_slice[m]), [])
            if swap[row] and lacking:
                text[row] = self.text_index[lacking[int(rng.integers(len(lacking)))]]
                empty[row] = True
        return PromptBatch(mask_ids=ids, mode="auto", text_ids=text,
                           guide="mask" if guided else None, category=True,
                           empty=empty if empty.any() else None)

    def _text(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.text_index[self.ds.categories[m]] for m in ids], np.int64)
