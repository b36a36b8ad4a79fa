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

__all__ = ["CT_WINDOWS", "normalize_intensity", "normalize_to_tensor", "ResizePad",
           "to_tensor_image"]

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


def _checked_image(image: np.ndarray) -> np.ndarray:
    """``image`` as a (Y, X) or (Y, X, 3) numeric array (alpha dropped), or a clear error."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3]
    elif image.ndim != 2:
        raise ValueError(f"expected a 2D (Y, X) or (Y, X, 3) image, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise TypeError(f"image dtype {image.dtype} is not numeric")
    if image.size == 0:
        raise ValueError("image is empty")
    return image


def _ct_window(dtype: np.dtype, window: str | tuple[float, float] | None,
               hu_offset: float | None) -> tuple[float, float, float]:
    """(low, high) HU of the CT window and the offset from stored values to HU."""
    if hu_offset is None:
        hu_offset = -1024.0 if np.issubdtype(dtype, np.unsignedinteger) else 0.0
    if window is None:
        window = "soft_tissue"
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; choose from {sorted(CT_WINDOWS)}")
        window = CT_WINDOWS[window]
    centre, width = window
    return centre - width / 2, centre + width / 2, hu_offset


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
    image = _checked_image(image)
    m = _resolve_modality(image, modality)
    data = image.astype(np.float32)
    if not np.isfinite(data).all():
        finite = np.isfinite(data)
        if not finite.any():
            raise ValueError("image has no finite values (all NaN/inf)")
        data = np.where(finite, data, np.nanmin(np.where(finite, data, np.nan)))
    if m == "CT":
        lo, hi, hu_offset = _ct_window(image.dtype, window, hu_offset)
        data = data + hu_offset
    elif image.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    else:
        lo, hi = np.percentile(data, [0.5, 99.5])
    scaled = (np.clip(data, lo, hi) - lo) / max(hi - lo, 1e-6) * 255.0
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[..., None], 3, axis=-1)
    return scaled.astype(np.float32)


def normalize_to_tensor(image: np.ndarray, modality: str = "auto",
                        window: str | tuple[float, float] | None = None,
                        hu_offset: float | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`normalize_intensity` as torch ops on ``device`` -> (1, 3, Y, X) float32.

    The raw slice crosses to the device in its stored dtype (a 512^2 int16 CT slice is 0.5 MB,
    its float32 RGB 3 MB), through pinned memory and asynchronously on CUDA; clipping,
    percentiles and scaling then run where the model is, so a GPU actor does not wait on one
    CPU thread. Equal to :func:`normalize_intensity` to float rounding.
    """
    image = _checked_image(image)
    m = _resolve_modality(image, modality)
    kind = image.dtype
    if kind == bool:
        raw = image.astype(np.uint8)
    elif kind in (np.uint16, np.uint32):  # torch's unsigned types above 8 bits lack ops
        raw = image.astype(np.int64)
    elif kind.kind == "f" and kind != np.float32:
        raw = image.astype(np.float32)
    else:
        raw = image
    dev = torch.device(device)
    t = torch.from_numpy(np.ascontiguousarray(raw))
    cuda = dev.type == "cuda"
    data = (t.pin_memory() if cuda else t).to(dev, non_blocking=cuda).float()
    if kind.kind == "f":
        finite = torch.isfinite(data)
        if not bool(finite.all()):
            if not bool(finite.any()):
                raise ValueError("image has no finite values (all NaN/inf)")
            data = torch.where(finite, data, data[finite].min())
    if m == "CT":
        lo_f, hi_f, hu_offset = _ct_window(kind, window, hu_offset)
        lo, hi = torch.tensor(lo_f, device=dev), torch.tensor(hi_f, device=dev)
        data = data + hu_offset
    elif kind == np.uint8:
        lo, hi = torch.tensor(0.0, device=dev), torch.tensor(255.0, device=dev)
    else:
        lo, hi = _percentiles(data.flatten(), 0.005, 0.995)
    scaled = (torch.minimum(torch.maximum(data, lo), hi) - lo) / (hi - lo).clamp_min(1e-6) * 255.0
    rgb = scaled.expand(3, *scaled.shape) if scaled.ndim == 2 else scaled.permute(2, 0, 1)
    return rgb.unsqueeze(0).contiguous()


def _percentiles(x: torch.Tensor, *qs: float) -> list[torch.Tensor]:
    """Linear-interpolated quantiles as numpy's ``percentile`` computes them (no host sync).

    Only the tail each quantile lies in is ordered (``topk``): a full sort is ~15x slower."""
    n = x.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        i = int(pos)
        j = min(i + 1, n - 1)
        if i < n // 2:    # the j + 1 smallest values, ascending: [i] and [j] are the order stats
            tail = x.topk(j + 1, largest=False, sorted=True).values
            a, b = tail[i], tail[j]
        else:             # the n - i largest, descending: order stat k sits at n - 1 - k
            tail = x.topk(n - i, largest=True, sorted=True).values
            a, b = tail[n - 1 - i], tail[n - 1 - j]
        out.append(a + (b - a) * (pos - i))
    return out


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
