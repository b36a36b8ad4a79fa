"""Driver-side reading of the input cohort: case checks, slice batches, boxes from labels.

The cohort is opened read-only (``segmote_core.io.open_cohort``); slices are read batch by batch
as the actors ask for work, so a volume is never loaded whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from segmote_core.geometry import masks_to_boxes
from segmote_core.io.cohort import missing_slices, valid_case_id
from segmote_core.io.image import ImageReadError, check_size

from .worker import SliceTask

__all__ = ["CaseInput", "CaseError", "open_case", "iter_tasks", "boxes_from_labels"]

log = logging.getLogger(__name__)


class CaseError(ValueError):
    """A case that cannot be segmented (wrong shape, corrupt data, missing label array)."""


@dataclass
class CaseInput:
    """One case to segment.

    Attributes:
        image: the zarr array, ``(Z, Y, X)``, ``(Y, X)`` or ``(Y, X, 3)``.
        shape: the labels' shape: ``(Z, Y, X)`` or ``(Y, X)``.
        box_source: label array the boxes come from (``--mode box``), else ``None``.
        input_signature: what identifies this version of the input case (its write stamp, or
            a data hash): the labels made from it record it, so a rewritten case is redone.
    """

    case_id: str
    image: Any
    axes: str
    modality: str
    shape: tuple[int, ...]
    box_source: Any = None
    where: str = ""
    input_signature: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return self.shape[0] if self.axes == "ZYX" else 1


def open_case(cohort: Any, case_id: str, mode: str = "auto", label_key: str = "labels") -> CaseInput:
    """Check one case of an open cohort and describe it.

    Raises:
        CaseError: naming the case and the problem (shape, dtype, missing labels).
    """
    where = f"{cohort.path}/{case_id}"
    try:
        valid_case_id(case_id)
    except ValueError as exc:  # e.g. a group named report.parquet: would clash with the report
        raise CaseError(f"{where}: {exc}") from None
    try:
        case = cohort.case(case_id)
    except Exception as exc:  # noqa: BLE001 - any reader error is this case's problem
        raise CaseError(f"{where}: cannot open case: {exc}") from exc
    image = case.image
    shape = tuple(int(s) for s in image.shape)
    if image.ndim not in (2, 3):
        raise CaseError(f"{where}/image: shape {shape} has {image.ndim} dimensions; expected "
                        "(Z, Y, X), (Y, X) or (Y, X, 3)")
    if 0 in shape:
        raise CaseError(f"{where}/image: empty image (shape {shape})")
    if np.dtype(image.dtype).kind not in "biuf":
        raise CaseError(f"{where}/image: dtype {image.dtype} is not numeric")
    axes = case.axes if image.ndim == 3 else "YX"
    spatial = shape[:2] if axes == "YXC" else shape
    if axes == "YXC" and shape[-1] != 3:
        raise CaseError(f"{where}/image: colour image with {shape[-1]} channels; expected 3")
    if min(spatial[-2:]) < 2:
        raise CaseError(f"{where}/image: slices of {spatial[-2:]} pixels are too small")
    try:
        check_size(f"{where}/image", shape, image.dtype, axes)
    except ImageReadError as exc:
        raise CaseError(str(exc)) from None
    box_source = None
    if mode == "box":
        group = cohort.root[case_id]
        if label_key not in group:
            raise CaseError(f"{where}: --mode box needs a '{label_key}' label array, "
                            f"the case has {sorted(k for k, _ in group.arrays())}")
        box_source = group[label_key]
        if tuple(box_source.shape) != tuple(spatial):
            raise CaseError(f"{where}/{label_key}: shape {tuple(box_source.shape)} differs from "
                            f"the image's spatial shape {tuple(spatial)}")
    try:
        signature = case.input_signature(("image", label_key) if mode == "box" else ("image",))
    except Exception as exc:  # noqa: BLE001 - unreadable data: this case's problem
        raise CaseError(f"{where}: cannot read the case to sign it: {type(exc).__name__}: "
                        f"{exc}") from exc
    return CaseInput(case_id, image, axes, case.modality, tuple(spatial), box_source, where,
                     signature)


def boxes_from_labels(labels: np.ndarray, label_id: int | None = None) -> np.ndarray:
    """Per-slice XYXY boxes around ``labels > 0`` (or ``== label_id``).

    Args:
        labels: ``(B, Y, X)`` integer ids.
    Returns:
        ``(B, 4)`` float32 ``x0, y0, x1, y1`` in pixels with the maximum inclusive, as SAM's box
        prompts (:mod:`segmote_core.geometry`); NaN rows where the slice holds no such label.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, Y, X), got shape {labels.shape}")
    return masks_to_boxes(labels > 0 if label_id is None else labels == label_id)


def read_batch(case: CaseInput, start: int, stop: int, label_id: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Slices ``start:stop`` as ``(B, Y, X)`` / ``(B, Y, X, 3)`` and their boxes (box mode).

    Raises:
        CaseError: the data could not be read or decoded (corrupt chunk, I/O error), or a
            chunk is missing from the store (it would read as zeros).
    """
    _check_chunks(case, case.image, "image", start, stop)
    if case.box_source is not None:
        _check_chunks(case, case.box_source, "labels", start, stop)
    try:
        if case.axes == "ZYX":
            slices = np.asarray(case.image[start:stop])
        else:
            slices = np.asarray(case.image[...])[None]
        boxes = None
        if case.box_source is not None:
            lab = (np.asarray(case.box_source[start:stop]) if case.axes == "ZYX"
                   else np.asarray(case.box_source[...])[None])
            boxes = boxes_from_labels(lab, label_id)
    except Exception as exc:  # noqa: BLE001 - codec/IO errors of all kinds
        raise CaseError(f"{case.where}: cannot read slices {start}-{stop - 1}: "
                        f"{type(exc).__name__}: {exc}") from exc
    return slices, boxes


def _check_chunks(case: CaseInput, arr: Any, name: str, start: int, stop: int) -> None:
    """Fail on slices whose chunk file is gone: zarr would hand back its fill value, zeros that
    look like data. Checked where the writer stored every chunk (``all_chunks_stored``, as
    :func:`segmote_core.io.write_case` does); other writers skip chunks equal to the fill value."""
    if dict(arr.attrs).get("all_chunks_stored") is not True:
        return
    missing = missing_slices(arr, start, stop) if case.axes == "ZYX" else missing_slices(arr, 0, 1)
    if missing:
        raise CaseError(f"{case.where}/{name}: the chunk of slice(s) "
                        f"{', '.join(str(z) for z in missing)} is missing from the store "
                        f"(deleted or lost): it would read as zeros; rewrite the case")


def iter_tasks(case: CaseInput, batch_size: int, label_value: int = 1,
               label_id: int | None = None) -> Iterator[SliceTask]:
    """Batches of at most ``batch_size`` consecutive slices of one case (never across cases,
    so a case's labels do not depend on what else the run holds)."""
    n = case.n_slices
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        slices, boxes = read_batch(case, start, stop, label_id)
        yield SliceTask(case.case_id, start, slices, case.modality, boxes, label_value)


def batch_count(n_slices: int, batch_size: int) -> int:
    return -(-n_slices // batch_size)
