"""Training slices from a labelled cohort: 2D images at the model's input size, one mask per
category per slice, with modality, dataset and category (cohorts as in docs/formats.md).

A case of a training cohort holds ``image`` ((Z, Y, X), (Y, X) or (Y, X, 3)) and ``labels``
(integer ids, same spatial shape); the case group's attrs carry ``dataset``, ``categories``
(``{"1": "grey_matter", ...}``), optionally ``auto_category`` (the union of all ids > 0, the
target of prompt-free PPT, e.g. ``"brain"``) and ``patient``. Volumes are read slice by slice.

Every slice is normalised with :func:`segmote_core.transforms.normalize_intensity` (as the
predictor does), resized with :class:`segmote_core.transforms.ResizePad` and padded to S x S.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segmote_core.progress import CancelToken, ProgressCallback, report
from segmote_core.transforms import ResizePad, normalize_intensity, to_tensor_image

from .selection import Selection, load_selection
from .cohort_reader import TrainingCase, open_training_cohort

__all__ = ["SliceDataset", "build_slice_dataset", "prepare_image", "prepare_labels", "model_input"]

log = logging.getLogger(__name__)


def prepare_image(image: np.ndarray, modality: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One 2D slice -> model input pixels.

    Args:
        image: (Y, X) or (Y, X, 3), any numeric dtype.
        modality: the case's modality (``"CT"``, ``"MR"``, ``"XR"``, ``"DERM"``, ...).
        size: the encoder's input side S.
    Returns:
        ``(pixels, (h, w))``: pixels (3, S, S) uint8 in [0, 255], padded bottom/right; (h, w) the
        resized image's extent inside the padded square.
    """
    rgb = normalize_intensity(image, modality)
    resized = ResizePad(size).apply_image(to_tensor_image(rgb))[0]
    h, w = resized.shape[-2:]
    out = np.zeros((3, size, size), np.uint8)
    out[:, :h, :w] = np.clip(resized.numpy() + 0.5, 0, 255).astype(np.uint8)
    return out, (int(h), int(w))


def model_input(model, images: np.ndarray | torch.Tensor, extents: np.ndarray) -> torch.Tensor:
    """(B, 3, S, S) stored pixels + (B, 2) extents -> the encoder input, as the predictor makes it.

    SAM normalises the resized image and pads *after* normalising (the padding is 0 in the
    normalised space, i.e. the pixel mean), so the padded border here is zeroed after
    :meth:`SegMoTE.preprocess` as well: training, evaluation and inference see the same input.
    """
    # the copy crosses in the stored dtype (uint8: 4x fewer bytes), float32 on the device
    x = torch.as_tensor(images).to(model.device).float()
    # Each image is preprocessed over its own extent (LiteMedSAM's min-max must not see the
    # padding), which pads with zeros after normalising as SAM does.
    return torch.cat([model.preprocess(x[b:b + 1, :, :h, :w])
                      for b, (h, w) in enumerate(np.asarray(extents, dtype=np.int64))])


def prepare_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """(Y, X) integer label slice -> (S, S) labels at the model input (nearest, padded with 0)."""
    labels = np.asarray(labels)
    h, w = ResizePad(size).new_size(*labels.shape)
    t = torch.from_numpy(labels.astype(np.int64))[None, None].float()
    resized = F.interpolate(t, size=(h, w), mode="nearest-exact")[0, 0].to(torch.int64).numpy()
    out = np.zeros((size, size), np.int64)
    out[:h, :w] = resized
    return out


@dataclass
class SliceDataset:
    """Slices and masks held in memory (model-input resolution).

    Slice arrays have N rows, mask arrays M rows; ``mask_slice[m]`` indexes the slice of mask m.

    Attributes:
        images: (N, 3, S, S) uint8 model-input pixels (normalised, resized, padded).
        extents: (N, 2) int (h, w) of the image inside the padded square.
        original_shapes: (N, 2) int (Y, X) of the slice in the cohort.
        cases, datasets, modalities, patients: per slice, length N.
        z: (N,) int slice index in its volume (0 for 2D images).
        masks: (M, S, S) bool ground truth at the model input.
        mask_slice: (M,) int; categories: per mask names, length M.
        binary: (M,) bool: PPT-eligible (the union mask of an ``auto_category`` dataset, or the
            only category of a single-category dataset).
        needs_text: (M,) bool: a part of a multi-category slice; its box alone is ambiguous, so
            prompts carry the category's text token.
        original_masks: per mask (Y, X) bool at the cohort's resolution, when kept (evaluation).
    """

    images: np.ndarray
    extents: np.ndarray
    original_shapes: np.ndarray
    cases: list[str]
    datasets: list[str]
    modalities: list[str]
    patients: list[str]
    z: np.ndarray
    masks: np.ndarray
    mask_slice: np.ndarray
    categories: list[str]
    binary: np.ndarray
    needs_text: np.ndarray
    original_masks: list[np.ndarray] | None = None
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_masks(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def vocabulary(self) -> tuple[str, ...]:
        """Sorted category names of all masks (the text guide's vocabulary)."""
        return tuple(sorted(set(self.categories)))

    def summary(self) -> dict[str, Any]:
        """Counts per dataset and category (kept in checkpoints and reports)."""
        per: dict[str, dict[str, Any]] = {}
        for m, cat in enumerate(self.categories):
            s = int(self.mask_slice[m])
            d = per.setdefault(self.datasets[s], {"modality": self.modalities[s], "masks": {},
                                                  "cases": set(), "slices": set()})
            d["masks"][cat] = d["masks"].get(cat, 0) + 1
            d["cases"].add(self.cases[s])
            d["slices"].add(s)
        return {"source": self.source, "slices": self.num_slices, "masks": self.num_masks,
                "datasets": {k: {"modality": v["modality"], "cases": len(v["cases"]),
                                 "slices": len(v["slices"]), "masks": v["masks"]}
                             for k, v in sorted(per.items())}}


def _slice_indices(case: TrainingCase, selection: Selection | None, stride: int,
                   cap: int | None) -> list[int]:
    if case.image.ndim == 2 or (case.image.ndim == 3 and case.image.shape[-1] == 3
                                and case.labels.ndim == 2):
        return [0]
    fg = None
    if selection is not None:
        chosen = selection.slices(case.case_id)
        if chosen is not None:
            bad = [z for z in chosen if not 0 <= z < case.image.shape[0]]
            if bad:
                raise ValueError(f"{case.source}: selection lists slices {bad[:5]} outside "
                                 f"0..{case.image.shape[0] - 1} of case {case.case_id!r}")
            fg = sorted(chosen)
    if fg is None:
        fg = [z for z in range(case.labels.shape[0]) if np.any(np.asarray(case.labels[z]))]
        fg = fg[::stride]
    if cap is not None and len(fg) > cap:
        keep = np.linspace(0, len(fg) - 1, cap).round().astype(int)
        fg = [fg[i] for i in keep]
    return fg


def build_slice_dataset(
    cohort: str | Path,
    *,
    image_size: int,
    selection: str | Path | Selection | None = None,
    split: str | None = "train",
    datasets: Sequence[str] = (),
    slice_stride: int = 1,
    max_slices_per_case: int | None = None,
    min_mask_pixels: int = 16,
    keep_original: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SliceDataset:
    """Read a labelled cohort into a :class:`SliceDataset`.

    Args:
        cohort: path of the cohort zarr.
        image_size: S, the model's input side.
        selection: ``selection.json`` of ``segmote curate`` (or a loaded one): which cases/slices,
            and the patient-level split; ``None``: every case, slices with foreground.
        split: the selection's split to use (``"train"`` / ``"test"``); ``None``: all.
        datasets: keep only these dataset names (empty: all).
        slice_stride: thinning of volumes without a selection.
        max_slices_per_case: cap per volume (evenly spaced), with or without a selection.
        min_mask_pixels: drop masks smaller than this at the model input.
        keep_original: also keep each mask at the cohort's resolution (for evaluation).
    Raises:
        ValueError: a case without labels or categories, or labels whose shape differs from
            the image, or no mask at all (each message names the cohort and the case).
    """
    sel = load_selection(selection) if isinstance(selection, (str, Path)) else selection
    cases = open_training_cohort(cohort)
    if sel is not None:
        wanted = set(sel.case_ids(split))
        missing = sorted(wanted - {c.case_id for c in cases})
        if missing:
            raise ValueError(f"{cohort}: selection {sel.source} names cases not in the cohort: "
                             f"{missing[:5]}")
        cases = [c for c in cases if c.case_id in wanted]
    if datasets:
        cases = [c for c in cases if c.dataset in set(datasets)]
    images, extents, shapes, zs = [], [], [], []
    meta: dict[str, list[str]] = {"cases": [], "datasets": [], "modalities": [], "patients": []}
    masks, mask_slice, cats, binary, needs_text, originals = [], [], [], [], [], []
    for i, case in enumerate(cases):
        for z in _slice_indices(case, sel, slice_stride, max_slices_per_case):
            img = np.asarray(case.image if case.is_2d else case.image[z])
            lab = np.asarray(case.labels if case.is_2d else case.labels[z])
            pixels, extent = prepare_image(img, case.modality, image_size)
            small = prepare_labels(lab, image_size)
            new = _masks_of_slice(case, lab, small, min_mask_pixels)
            if not new:
                continue
            s = len(images)
            images.append(pixels)
            extents.append(extent)
            shapes.append(lab.shape[:2])
            zs.append(z)
            for key, value in (("cases", case.case_id), ("datasets", case.dataset),
                               ("modalities", case.modality), ("patients", case.patient)):
                meta[key].append(value)
            for cat, m_small, m_orig, is_bin, text in new:
                masks.append(m_small)
                mask_slice.append(s)
                cats.append(cat)
                binary.append(is_bin)
                needs_text.append(text)
                if keep_original:
                    originals.append(m_orig)
        report(progress, i + 1, len(cases), cancel)
    if not masks:
        raise ValueError(f"{cohort}: no masks of at least {min_mask_pixels} pixels in "
                         f"{len(cases)} case(s) (split={split!r}, datasets={list(datasets)})")
    ds = SliceDataset(
        images=np.stack(images), extents=np.asarray(extents, np.int64),
        original_shapes=np.asarray(shapes, np.int64), z=np.asarray(zs, np.int64),
        masks=np.stack(masks), mask_slice=np.asarray(mask_slice, np.int64), categories=cats,
        binary=np.asarray(binary, bool), needs_text=np.asarray(needs_text, bool),
        original_masks=originals if keep_original else None, source=str(cohort),
        info={"split": split, "selection": None if sel is None else sel.source}, **meta)
    log.info("%s: %d slices, %d masks from %d cases", cohort, ds.num_slices, ds.num_masks,
             len(cases))
    return ds


def _masks_of_slice(case: TrainingCase, labels: np.ndarray, small: np.ndarray,
                    min_pixels: int) -> list[tuple[str, np.ndarray, np.ndarray, bool, bool]]:
    """(category, mask at S, mask at original size, binary, needs_text) per category present."""
    out = []
    present = [(int(k), name) for k, name in case.categories.items()
               if np.any(small == int(k))]
    single = len(case.categories) == 1
    for k, name in present:
        m = small == k
        if m.sum() < min_pixels:
            continue
        is_bin = single and case.auto_category in (None, name)
        out.append((name, m, labels == k, is_bin, not single))
    if case.auto_category is not None and not (single and case.auto_category in case.categories.values()):
        union = small > 0
        if union.sum() >= min_pixels:
            out.append((case.auto_category, union, labels > 0, True, False))
    return out

