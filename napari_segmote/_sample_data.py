"""npe2 sample data: the phantoms of ``segmote_core.sample_images`` as napari layers.

Each image comes with its ground truth as a Labels layer, which doubles as a mask prompt source
for the "refine" workflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segmote_core.sample_images import make_ct_phantom, make_dermoscopy_phantom

__all__ = ["ct_phantom", "dermoscopy_phantom"]


def _affine(spacing: tuple[float, ...]) -> list[list[float]]:
    aff = np.eye(4)
    aff[: len(spacing), : len(spacing)] = np.diag(spacing)
    return aff.tolist()


def ct_phantom() -> list[tuple[Any, dict, str]]:
    """npe2 sample data: the CT phantom and its reference labels."""
    vol, labels, spacing = make_ct_phantom()
    meta = {"segmote": {"modality": "CT", "spacing": list(spacing), "affine": _affine(spacing),
                        "source": "segmote sample: ct_phantom"}}
    return [
        (vol, {"name": "CT phantom", "scale": spacing, "metadata": meta,
               "axis_labels": ("z", "y", "x"),
               "contrast_limits": (-160, 240), "colormap": "gray"}, "image"),
        (labels, {"name": "CT phantom reference", "scale": spacing, "metadata": meta,
                  "axis_labels": ("z", "y", "x"),
                  "visible": False}, "labels"),
    ]


def dermoscopy_phantom() -> list[tuple[Any, dict, str]]:
    """npe2 sample data: an RGB dermoscopy phantom and its lesion mask."""
    img, mask = make_dermoscopy_phantom()
    meta = {"segmote": {"modality": "DERM", "spacing": [1.0, 1.0], "affine": _affine((1.0, 1.0)),
                        "source": "segmote sample: dermoscopy_phantom"}}
    return [
        (img, {"name": "Dermoscopy phantom", "rgb": True, "metadata": meta,
               "axis_labels": ("y", "x")}, "image"),
        (mask, {"name": "Dermoscopy phantom reference", "metadata": meta, "visible": False,
                "axis_labels": ("y", "x")}, "labels"),
    ]
