"""Labelled training cases of a cohort (docs/formats.md), with the attrs training needs checked.

Uses :func:`segmote_core.io.open_cohort` when the core provides it, else reads the zarr layout of
the cohort format directly (``<case>/image``, ``<case>/labels``, case attrs ``dataset``, ``categories``,
``auto_category``, ``patient``; image attrs ``modality``). Arrays stay lazy (zarr): volumes are
read one slice at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrainingCase", "open_training_cohort"]


@dataclass(frozen=True)
class TrainingCase:
    """One case with ground truth. ``image``/``labels`` are array-likes (zarr)."""

    case_id: str
    image: Any                 # (Z, Y, X), (Y, X) or (Y, X, 3)
    labels: Any                # (Z, Y, X) or (Y, X) integer ids
    modality: str
    dataset: str
    categories: dict[str, str]  # label id (string) -> category name
    auto_category: str | None
    patient: str
    source: str

    @property
    def is_2d(self) -> bool:
        return self.labels.ndim == 2


def _raw_cases(path: Path) -> list[tuple[str, Any, Any, dict, dict]]:
    """(case_id, image, labels, case attrs, image attrs) per case."""
    try:
        from segmote_core.io import open_cohort  # the core's cohort reader, when installed
    except ImportError:
        open_cohort = None
    if open_cohort is not None:
        coh = open_cohort(str(path))
        out = []
        for cid in coh.case_ids():
            case = coh.case(cid)
            img_attrs = dict(getattr(case.image, "attrs", {}) or {})
            img_attrs.setdefault("modality", case.modality)
            out.append((cid, case.image, case.labels, dict(case.attrs), img_attrs))
        return out
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing / foreign store
        raise ValueError(f"{path}: not a readable zarr cohort ({type(exc).__name__}: {exc})") from exc
    kind = dict(root.attrs).get("segmote", {}).get("kind")
    if kind != "cohort":
        raise ValueError(f"{path}: not a SegMoTE cohort (attrs['segmote']['kind'] is {kind!r})")
    out = []
    for cid in sorted(name for name, _ in root.groups()):
        group = root[cid]
        if "image" not in group:
            raise ValueError(f"{path}: case {cid!r} has no 'image' array")
        labels = group["labels"] if "labels" in group else None
        out.append((cid, group["image"], labels, dict(group.attrs), dict(group["image"].attrs)))
    return out


def open_training_cohort(path: str | Path) -> list[TrainingCase]:
    """All cases of a labelled cohort, sorted by id.

    Raises:
        FileNotFoundError: no such path.
        ValueError: not a cohort, or a case without labels / categories / dataset, or labels of
            another shape than the image (the message names the cohort and the case).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cohort not found: {path}")
    cases = []
    for cid, image, labels, attrs, img_attrs in _raw_cases(path):
        where = f"{path}: case {cid!r}"
        if labels is None:
            raise ValueError(f"{where}: no 'labels' array (training needs ground truth)")
        spatial = image.shape[:2] if (image.ndim == 3 and image.shape[-1] == 3
                                      and labels.ndim == 2) else image.shape
        if tuple(labels.shape) != tuple(spatial):
            raise ValueError(f"{where}: labels shape {tuple(labels.shape)} differs from image "
                             f"shape {tuple(image.shape)}")
        categories = attrs.get("categories")
        if not isinstance(categories, dict) or not categories:
            raise ValueError(f"{where}: attrs['categories'] must map label ids to names, "
                             f"got {categories!r}")
        try:
            categories = {str(int(k)): str(v) for k, v in categories.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: category ids must be integers, got "
                             f"{list(categories)}") from exc
        modality = img_attrs.get("modality") or attrs.get("modality")
        if not modality:
            raise ValueError(f"{where}: no modality in the image attrs")
        cases.append(TrainingCase(
            case_id=cid, image=image, labels=labels, modality=str(modality),
            dataset=str(attrs.get("dataset") or "default"), categories=categories,
            auto_category=attrs.get("auto_category"), patient=str(attrs.get("patient", cid)),
            source=str(path)))
    if not cases:
        raise ValueError(f"{path}: the cohort has no cases")
    return cases
