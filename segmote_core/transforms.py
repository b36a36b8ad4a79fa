"""Modality-aware intensity normalisation and resize/pad to the encoder (no torchvision).

Every image becomes float32 RGB pixels in [0, 255] (what SAM's pixel mean/std expect):

- ``CT``: a window (centre, width) in Hounsfield units, ``soft_tissue`` by default. Unsigned
  integer CT (DICOM-style stored values) is taken as HU + 1024 (RescaleIntercept -1024);
  pass ``hu_offset`` to override.
- ``MR*``, ``PET`` and other float or 16-bit data: clipped to the 0.5-99.5 percentiles.
- ``uint8`` data (``XR``, ``DERM``, RGB photographs): passed through.
- ``"auto"``: uint8 -> pass-through; signed data reaching below -500 -> CT; else percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CT_WINDOWS", "normalize_intensity", "ResizePad", "to_tensor_image"]

#: CT windows as (centre, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}


def _resolve_modality(image: np.ndarray, modality: str) -> str:
    m = (modality or "auto").upper()
    if m != "AUTO":
        return m
    if image.dtype == np.uint8:
        return "XR"
    if np.issubdtype(image.dtype, np.signedinteger) and image.size and image.min() < -500:
        return "CT"
    return "MR"


def normalize_intensity(image: np.ndarray, modality: str = "auto",
                        window: str | tuple[float, float] | None = None,
                        hu_offset: float | None = None) -> np.ndarray:
    """Map a 2D image of any dtype to float32 RGB in [0, 255].

    Args:
        image: (Y, X) grey or (Y, X, 3) RGB, any numeric dtype.
        modality: ``"CT"``, ``"MR"``, ``"MR_T1W"``, ``"XR"``, ``"DERM"``, ... or ``"auto"``.
        window: CT window name (:data:`CT_WINDOWS`) or (centre, width) in HU.
        hu_offset: added to stored values to get HU (default: -1024 for unsigned CT, else 0).
    Returns:
        (Y, X, 3) float32.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3]
    elif image.ndim != 2:
        raise ValueError(f"expected a 2D (Y, X) or (Y, X, 3) image, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise TypeError(f"image dtype {image.dtype} is not numeric")
    if image.size == 0:
        raise ValueError("image is empty")
    m = _resolve_modality(image, modality)
    data = image.astype(np.float32)
    if not np.isfinite(data).all():
        finite = np.isfinite(data)
        if not finite.any():
            raise ValueError("image has no finite values (all NaN/inf)")
        data = np.where(finite, data, np.nanmin(np.where(finite, data, np.nan)))
    if m == "CT":
        if hu_offset is None:
            hu_offset = -1024.0 if np.issubdtype(image.dtype, np.unsignedinteger) else 0.0
        if window is None:
            window = "soft_tissue"
        if isinstance(window, str):
            if window not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {window!r}; choose from {sorted(CT_WINDOWS)}")
            window = CT_WINDOWS[window]
        centre, width = window
        lo, hi = centre - width / 2, centre + width / 2
        data = data + hu_offset
    elif image.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    else:
        lo, hi = np.percentile(data, [0.5, 99.5])
    scaled = (np.clip(data, lo, hi) - lo) / max(hi - lo, 1e-6) * 255.0
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[..., None], 3, axis=-1)
    return scaled.astype(np.float32)


@dataclass(frozen=True)
class ResizePad:
    """Resize so the longest side is ``target`` (SAM's ResizeLongestSide), pad bottom/right."""

    target: int

    def new_size(self, h: int, w: int) -> tuple[int, int]:
        scale = self.target / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def apply_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> (B, 3, h', w') with max(h', w') == target (not yet padded)."""
        h, w = image.shape[-2:]
        nh, nw = self.new_size(h, w)
        if (nh, nw) == (h, w):
            return image
        return F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False,
                             antialias=True).clamp_(0, 255)

    def apply_coords(self, coords: np.ndarray | torch.Tensor, original_size: tuple[int, int]):
        """XY pixel coordinates (..., 2) of the original image -> the resized frame."""
        h, w = original_size
        nh, nw = self.new_size(h, w)
        if isinstance(coords, torch.Tensor):
            scale = torch.tensor([nw / w, nh / h], dtype=torch.float32, device=coords.device)
            return coords.float() * scale
        return np.asarray(coords, dtype=np.float32) * np.array([nw / w, nh / h], np.float32)

    def apply_boxes(self, boxes, original_size: tuple[int, int]):
        """XYXY boxes (..., 4) -> the resized frame."""
        shape = boxes.shape
        return self.apply_coords(boxes.reshape(*shape[:-1], 2, 2), original_size).reshape(shape)


def to_tensor_image(rgb: np.ndarray) -> torch.Tensor:
    """(Y, X, 3) float32 -> (1, 3, Y, X)."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
