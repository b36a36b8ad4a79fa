"""The in-memory description of a medical image and the errors its readers raise.

Axis conventions (docs/ARCHITECTURE.md): volumes are ``(Z, Y, X)``, 2D images ``(Y, X)`` grey or
``(Y, X, 3)`` RGB. ``spacing`` is in mm in the same axis order as the data. ``affine`` is the
``(4, 4)`` map from voxel indices ``(z, y, x, 1)`` to world coordinates (NIfTI's RAS+ millimetres
when the source is NIfTI). A NIfTI file stores its voxels as ``(i, j, k) = (X, Y, Z)``: the
readers reverse the axes and permute the affine's columns accordingly
(:func:`nifti_to_zyx_affine`); the writers undo both, so labels written with a source image's
affine overlay it in ITK-SNAP or 3D Slicer whatever its orientation (RAS, LPS, oblique).
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "MedicalImage", "ImageReadError", "ImageTypeError", "nifti_to_zyx_affine",
    "zyx_to_nifti_affine", "spacing_affine", "check_image_dtype", "check_finite", "array_of",
    "SqueezedView", "unit_to_mm", "ReadLimits", "read_limits", "current_limits", "check_size",
]

_PERMUTE = [2, 1, 0, 3]  # (i, j, k, 1) <-> (z, y, x, 1): reversing the three voxel axes


class ImageReadError(ValueError):
    """A file or case that cannot be used as an image. ``str()`` names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ImageTypeError(ImageReadError, TypeError):
    """An image whose dtype is not numeric (complex, structured, string, object...)."""


def nifti_to_zyx_affine(affine: np.ndarray) -> np.ndarray:
    """A NIfTI ``(i, j, k) -> world`` affine to the ``(z, y, x) -> world`` one of reversed data."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {affine.shape}")
    return affine[:, _PERMUTE].copy()


def zyx_to_nifti_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`nifti_to_zyx_affine` (the permutation is its own inverse)."""
    return nifti_to_zyx_affine(affine)


def spacing_affine(spacing: tuple[float, ...]) -> np.ndarray:
    """The ``(z, y, x) -> world`` affine of an axis-aligned grid with ``spacing`` (z, y, x) or
    (y, x) mm, world axes ``(x, y, z)`` as in NIfTI: its NIfTI form is ``diag(sx, sy, sz, 1)``."""
    sp = [float(s) for s in spacing]
    if len(sp) == 2:
        sp = [1.0] + sp
    if len(sp) != 3 or any(not np.isfinite(s) or s <= 0 for s in sp):
        raise ValueError(f"spacing must be 2 or 3 positive finite numbers, got {spacing}")
    sz, sy, sx = sp
    return nifti_to_zyx_affine(np.diag([sx, sy, sz, 1.0]))


def check_image_dtype(dtype: np.dtype, path: str | Path, what: str = "image") -> np.dtype:
    """Accept integer, unsigned, float and bool dtypes; raise :class:`ImageTypeError` otherwise."""
    dtype = np.dtype(dtype)
    if dtype.names is not None:
        raise ImageTypeError(path, f"{what} has a structured dtype {dtype} (e.g. NIfTI RGB24); "
                                   "expected one scalar per voxel")
    if dtype.kind not in "biuf":
        raise ImageTypeError(path, f"{what} has dtype {dtype}, which is not a real number type "
                                   "(expected integer or floating point)")
    return dtype


def check_finite(sample: np.ndarray, path: str | Path, where: str = "") -> None:
    """Raise :class:`ImageReadError` when ``sample`` holds no finite value (all NaN / inf)."""
    if sample.dtype.kind == "f" and sample.size and not np.isfinite(sample).any():
        raise ImageReadError(path, f"{where}all values are NaN or infinite")


@dataclass
class MedicalImage:
    """An opened image with its geometry.

    Attributes:
        data: ``(Z, Y, X)`` volume as a lazy ``dask.array`` (chunks of whole slices), or a numpy
            ``(Y, X)`` / ``(Y, X, 3)`` 2D image.
        spacing: voxel size in mm, same order as the spatial axes of ``data``.
        affine: ``(4, 4)`` voxel ``(z, y, x, 1)`` -> world (for 2D, ``z = 0``).
        modality: ``"CT"``, ``"MR"``, ``"XR"``, ``"DERM"``, ...
        axes: ``"ZYX"``, ``"YX"`` or ``"YXC"``.
        source: the path it was read from.
        meta: reader-specific extras (``"format"``, NIfTI ``"orientation"`` codes, ...).
    """

    data: Any
    spacing: tuple[float, ...]
    affine: np.ndarray
    modality: str
    axes: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def is_volume(self) -> bool:
        return self.axes == "ZYX"

    @property
    def n_slices(self) -> int:
        return self.shape[0] if self.is_volume else 1

    def slice(self, z: int) -> np.ndarray:
        """The 2D numpy slice ``z`` of a volume (reads only that slice); the image itself if 2D."""
        if not self.is_volume:
            if z != 0:
                raise IndexError(f"{self.source}: a 2D image has only slice 0, asked for {z}")
            return np.asarray(self.data)
        if not 0 <= z < self.shape[0]:
            raise IndexError(f"{self.source}: slice {z} outside 0..{self.shape[0] - 1}")
        return np.asarray(self.data[z])

    def __repr__(self) -> str:
        return (f"MedicalImage({self.source!r}, shape={self.shape}, axes={self.axes!r}, "
                f"modality={self.modality!r}, spacing={tuple(round(s, 4) for s in self.spacing)})")


def array_of(volume: Any) -> Any:
    """The pixel array of a :class:`MedicalImage`, or ``volume`` itself when it is an array
    (numpy's own ``.data`` is a memoryview, so ``getattr(x, "data", x)`` would be wrong)."""
    return volume.data if isinstance(volume, MedicalImage) else volume


class SqueezedView:
    """An indexable array (zarr, nibabel proxy) with some singleton axes fixed to 0.

    ``index`` has one entry per axis of ``arr``: ``slice(None)`` keeps the axis, ``0`` drops it.
    Indexing reads only the requested part of ``arr``.
    """

    def __init__(self, arr: Any, index: tuple, dtype: Any = None) -> None:
        self.arr, self.index = arr, tuple(index)
        self.shape = tuple(int(s) for s, i in zip(arr.shape, self.index) if isinstance(i, slice))
        self.dtype = np.dtype(dtype if dtype is not None else arr.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key == (Ellipsis,):
            key = ()
        rest = list(key) + [slice(None)] * (self.ndim - len(key))
        full = tuple(rest.pop(0) if isinstance(i, slice) else i for i in self.index)
        return np.asarray(self.arr[full])


_UNIT_MM = {"mm": 1.0, "millimeter": 1.0, "millimetre": 1.0, "cm": 10.0, "centimeter": 10.0,
            "m": 1000.0, "meter": 1000.0, "um": 1e-3, "\u00b5m": 1e-3, "\u03bcm": 1e-3,
            "micron": 1e-3, "micrometer": 1e-3, "nm": 1e-6, "nanometer": 1e-6}


def unit_to_mm(unit: str | None, default: float = 1.0) -> float:
    """Millimetres per ``unit`` (``"mm"``, ``"µm"``, ``"micrometer"``, ``"cm"``...); ``default``
    for a missing or unknown unit (e.g. ImageJ's ``"pixel"``)."""
    if not unit:
        return default
    return _UNIT_MM.get(str(unit).strip().lower(), default)


# ---------------------------------------------------------------------------- size budgets
@dataclass(frozen=True)
class ReadLimits:
    """How large an image may be, checked from its header before any pixel is read.

    A corrupt or hostile header can declare any shape (a 60-byte ``.nii.gz`` declaring
    50000 x 50000); the readers refuse it here instead of allocating gigabytes. Sizes are in MiB
    of the decoded array (its own dtype). ``None`` fields take the environment's
    ``SEGMOTE_MAX_SLICE_MB`` / ``SEGMOTE_MAX_VOLUME_MB``, else the defaults: 1024 MiB per slice
    (a 2D image is one slice), 32768 MiB per volume (read lazily, but written and segmented
    whole).
    """

    slice_mb: float | None = None
    volume_mb: float | None = None

    DEFAULT_SLICE_MB = 1024.0
    DEFAULT_VOLUME_MB = 32768.0

    def resolved(self) -> tuple[float, float]:
        def pick(value: float | None, env: str, default: float) -> float:
            if value is not None:
                return float(value)
            raw = os.environ.get(env)
            try:
                return float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{env}={raw!r} is not a number of MiB") from None
        return (pick(self.slice_mb, "SEGMOTE_MAX_SLICE_MB", self.DEFAULT_SLICE_MB),
                pick(self.volume_mb, "SEGMOTE_MAX_VOLUME_MB", self.DEFAULT_VOLUME_MB))


_LIMITS: contextvars.ContextVar[ReadLimits | None] = contextvars.ContextVar(
    "segmote_read_limits", default=None)


def current_limits() -> ReadLimits:
    """The budgets in force (:func:`read_limits`), else the environment's or the defaults."""
    return _LIMITS.get() or ReadLimits()


@contextmanager
def read_limits(limits: ReadLimits | None) -> Iterator[None]:
    """Every reader called inside uses ``limits`` (``None``: leave the budgets as they are)."""
    if limits is None:
        yield
        return
    token = _LIMITS.set(limits)
    try:
        yield
    finally:
        _LIMITS.reset(token)


def _mib(n: float) -> str:
    return f"{n:.3g}" if n < 1 else f"{n:,.0f}"


def check_size(path: str | Path, shape: tuple[int, ...], dtype: Any, axes: str,
               limits: ReadLimits | None = None) -> None:
    """Refuse an image whose header declares more than the budgets allow (before reading it).

    Args:
        shape: the declared shape; ``axes`` ``"ZYX"`` (a volume), ``"YX"`` or ``"YXC"``.
    Raises:
        ImageReadError: naming the file, the size, the budget and how to raise it.
    """
    slice_mb, volume_mb = (limits or current_limits()).resolved()
    shape = tuple(int(s) for s in shape)
    item = np.dtype(dtype).itemsize if dtype is not None else 1
    per_slice = (shape[1:] if axes == "ZYX" else shape)
    slice_bytes = float(np.prod(per_slice, dtype=np.float64)) * item
    total = float(np.prod(shape, dtype=np.float64)) * item
    what = " x ".join(str(s) for s in per_slice)
    if slice_bytes > slice_mb * 2 ** 20:
        raise ImageReadError(path, f"a slice of {what} {np.dtype(dtype)} needs "
                                   f"{_mib(slice_bytes / 2 ** 20)} MiB, more than the per-slice "
                                   f"budget of {_mib(slice_mb)} MiB (a corrupt header, or an "
                                   f"unusually large image: raise the budget with --max-slice-mb "
                                   f"or SEGMOTE_MAX_SLICE_MB)")
    if total > volume_mb * 2 ** 20:
        raise ImageReadError(path, f"a volume of {' x '.join(str(s) for s in shape)} "
                                   f"{np.dtype(dtype)} needs {_mib(total / 2 ** 20)} MiB, more "
                                   f"than the per-volume budget of {_mib(volume_mb)} MiB (a "
                                   f"corrupt header, or an unusually large image: raise the "
                                   f"budget with --max-volume-mb or SEGMOTE_MAX_VOLUME_MB)")
