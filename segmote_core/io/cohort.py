"""The cohort format of SPEC 2.1: one zarr v3 group per case, whole-slice chunks.

```
cohort.zarr/            attrs {"segmote": {"kind": "cohort", "version": 1}}
  <case_id>/            attrs: modality, spacing, affine, + dataset/categories/... (training)
    image               (Z, Y, X), (Y, X) or (Y, X, 3); chunks of whole slices
    labels              optional ground truth, same spatial shape
```
Input cohorts are opened read-only by every consumer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr

__all__ = ["CohortError", "Case", "Cohort", "create_cohort", "write_case", "open_cohort",
           "slice_chunks", "COHORT_KIND"]

COHORT_KIND = {"kind": "cohort", "version": 1}
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CohortError(ValueError):
    """A cohort store or one of its cases is missing, malformed or unreadable."""


def slice_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of whole slices: (1, Y, X) for volumes, the whole image for 2D/RGB."""
    if len(shape) == 3 and shape[-1] not in (3, 4):
        return (1, shape[1], shape[2])
    return tuple(shape)


def create_cohort(path: str | Path) -> zarr.Group:
    """Create (or open, if it is one already) a cohort store at ``path``."""
    path = Path(path)
    if path.exists():
        root = zarr.open_group(str(path), mode="r+")
        if root.attrs.get("segmote", {}).get("kind") != "cohort":
            raise CohortError(f"{path}: exists and is not a SegMoTE cohort")
        return root
    root = zarr.open_group(str(path), mode="w-")
    root.attrs["segmote"] = dict(COHORT_KIND)
    return root


def write_case(cohort: str | Path, case_id: str, image: np.ndarray, *,
               spacing: tuple[float, ...] | None = None, affine: np.ndarray | None = None,
               modality: str = "CT", labels: np.ndarray | None = None,
               attrs: Mapping[str, Any] | None = None, overwrite: bool = True) -> None:
    """Write one case (image, optional labels, attrs) into a cohort store."""
    if not _CASE_ID.match(case_id):
        raise CohortError(f"case id {case_id!r} must be letters, digits, '.', '_' or '-'")
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise CohortError(f"case {case_id!r}: image must be 2D or 3D, got shape {image.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        spatial = image.shape[:2] if image.ndim == 3 and image.shape[-1] in (3, 4) else image.shape
        if labels.shape != spatial:
            raise CohortError(f"case {case_id!r}: labels {labels.shape} do not match the image "
                              f"{spatial}")
    root = create_cohort(cohort)
    if case_id in root and overwrite:
        del root[case_id]
    group = root.create_group(case_id)
    ndim_spatial = 2 if image.ndim == 2 or image.shape[-1] in (3, 4) else 3
    if spacing is None:
        spacing = (1.0,) * ndim_spatial
    if affine is None:
        diag = [float(s) for s in list(spacing)[-3:]]
        affine = np.diag(diag + [1.0] * (4 - len(diag)))  # voxel (z, y, x) -> mm
    group.attrs.update({"modality": modality, "spacing": [float(s) for s in spacing],
                        "affine": np.asarray(affine, dtype=float).tolist(), **dict(attrs or {})})
    arr = group.create_array("image", shape=image.shape, dtype=image.dtype,
                             chunks=slice_chunks(image.shape))
    arr[...] = image
    if labels is not None:
        lab = group.create_array("labels", shape=labels.shape, dtype=labels.dtype,
                                 chunks=slice_chunks(labels.shape))
        lab[...] = labels


@dataclass
class Case:
    """One case of a cohort, read lazily (zarr arrays)."""

    case_id: str
    image: zarr.Array
    labels: zarr.Array | None
    spacing: tuple[float, ...]
    affine: np.ndarray
    modality: str
    attrs: dict[str, Any] = field(default_factory=dict)


class Cohort:
    """A read-only view of a cohort store."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CohortError(f"{self.path}: no such cohort")
        try:
            self.root = zarr.open_group(str(self.path), mode=mode)
        except Exception as exc:  # zarr raises several types for a non-store
            raise CohortError(f"{self.path}: not a zarr group ({exc})") from exc
        if self.root.attrs.get("segmote", {}).get("kind") != "cohort":
            raise CohortError(f"{self.path}: not a SegMoTE cohort (attrs lack "
                              f"segmote.kind == 'cohort')")

    def case_ids(self) -> list[str]:
        return sorted(name for name, _ in self.root.groups())

    def __len__(self) -> int:
        return len(self.case_ids())

    def case(self, case_id: str) -> Case:
        try:
            group = self.root[case_id]
            image = group["image"]
        except KeyError as exc:
            raise CohortError(f"{self.path}: case {case_id!r} has no image array") from exc
        except Exception as exc:
            raise CohortError(f"{self.path}: case {case_id!r} is unreadable ({exc})") from exc
        attrs = dict(group.attrs)
        labels = group["labels"] if "labels" in group else None
        return Case(
            case_id=case_id, image=image, labels=labels,
            spacing=tuple(attrs.get("spacing", ())), affine=np.asarray(attrs.get("affine", np.eye(4))),
            modality=str(attrs.get("modality", "auto")), attrs=attrs,
        )


def open_cohort(path: str | Path) -> Cohort:
    """Open a cohort read-only; raises :class:`CohortError` naming the path if it is not one."""
    return Cohort(path, mode="r")
