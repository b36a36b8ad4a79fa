"""File names to case ids, and the label file of a case (docs/medical_io.md, "Labels are paired
by case id"): what ``segmote ingest`` pairs, in one place."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .readers import IMAGE_SUFFIXES

__all__ = ["LABEL_TAGS", "strip_suffix", "case_id_from_path", "is_label_name",
           "label_candidates", "find_labels"]

LABEL_TAGS = ("_seg", "_label", "_labels", "_mask", "_gt")
_ALL_SUFFIXES = sorted(IMAGE_SUFFIXES + (".ome.tif", ".ome.tiff"), key=len, reverse=True)


def strip_suffix(name: str) -> str:
    """``name`` without its image suffix (the longest that fits: ``.nii.gz``, ``.ome.tif``)."""
    low = name.lower()
    for suf in _ALL_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def case_id_from_path(path: str | Path) -> str:
    """A case id from a file name: suffixes and nnU-Net's ``_0000`` dropped, odd characters -> _."""
    stem = re.sub(r"_0000$", "", strip_suffix(Path(path).name))
    cid = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")
    return cid[:128] or "case"


def is_label_name(name: str) -> bool:
    """A file named as labels (``<case>_seg.nii.gz``...): beside the images it is not an image."""
    return strip_suffix(name).lower().endswith(LABEL_TAGS)


def label_candidates(image: Path, case_id: str, folders: Sequence[Path]) -> list[Path]:
    """Where a case's label file may be, in the order tried (docs/medical_io.md): in each
    folder the image's own file name; ``<case>`` with any supported suffix (nnU-Net:
    ``imagesTr/pt000_0000.nii.gz`` pairs with ``labelsTr/pt000.nii.gz``), only in a folder that
    is not the image's own, where such a file is another image; then ``<case>_seg``,
    ``_label``, ``_labels``, ``_mask`` and ``_gt`` with any suffix."""
    out: list[Path] = []
    stems = list(dict.fromkeys([case_id, strip_suffix(image.name)]))
    for folder in folders:
        if folder / image.name != image:
            out.append(folder / image.name)
        if folder.resolve() != image.parent.resolve():
            out += [folder / f"{stem}{suf}" for stem in stems for suf in IMAGE_SUFFIXES]
        out += [folder / f"{stem}{tag}{suf}" for tag in LABEL_TAGS for stem in stems
                for suf in IMAGE_SUFFIXES]
    return out


def find_labels(image: Path, case_id: str, folders: Sequence[Path]) -> Path | None:
    """The first of :func:`label_candidates` that exists (never the image itself), or None."""
    for cand in label_candidates(image, case_id, folders):
        if cand.exists() and cand.resolve() != image.resolve():
            return cand
    return None
