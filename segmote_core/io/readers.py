"""Readers: NIfTI, TIFF / OME-TIFF, PNG / JPEG, zarr / OME-Zarr, DICOM -> :class:`MedicalImage`.

Volumes stay lazy: a ``dask.array`` with one chunk per slice over nibabel's array proxy, tifffile's
zarr view of the pages, or the zarr array itself, so memory does not grow with the number of
slices. At open, a reader checks the header (shape, dtype) and reads three sample slices (first,
middle, last), so a truncated, empty or NaN-filled file fails here, with the file named, rather
than deep inside a run.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .image import (ImageReadError, MedicalImage, ReadLimits, SqueezedView, check_finite,
                    check_image_dtype, check_size, nifti_to_zyx_affine, read_limits,
                    spacing_affine, unit_to_mm)

__all__ = ["open_image", "guess_modality", "image_format", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)
_PIL_GUARD = threading.Lock()  # PIL's bomb guard is a module global

_NIFTI = (".nii", ".nii.gz")
_TIFF = (".tif", ".tiff")
_PIL = (".png", ".jpg", ".jpeg", ".bmp")
_DICOM = (".dcm", ".dicom", ".ima")
IMAGE_SUFFIXES = _NIFTI + _TIFF + _PIL + (".zarr",) + _DICOM


def image_format(path: str | Path) -> str | None:
    """``"nifti"``, ``"tiff"``, ``"pil"``, ``"zarr"`` or ``"dicom"`` from the name (a zarr may be
    any dir), or from the content: a file with the DICOM marker, a folder holding DICOM files."""
    name = Path(path).name.lower()
    if name.endswith(_NIFTI):
        return "nifti"
    if name.endswith(_TIFF):
        return "tiff"
    if name.endswith(_PIL):
        return "pil"
    p = Path(path)
    if name.endswith(".zarr") or (p.is_dir() and any((p / m).exists() for m in
                                                     ("zarr.json", ".zgroup", ".zarray"))):
        return "zarr"
    from .dicom import holds_dicom, is_dicom_file

    if (p.is_file() and is_dicom_file(p)) or (p.is_dir() and holds_dicom(p)):
        return "dicom"
    return None


def guess_modality(sample: np.ndarray, rgb: bool = False, is_2d: bool = False) -> str:
    """A modality from pixel values: RGB -> ``DERM``; 2D uint8 -> ``XR``; values below -500 HU
    -> ``CT``; anything else ``MR`` (percentile normalisation). Pass ``modality=`` to be sure."""
    if rgb:
        return "DERM"
    if is_2d and sample.dtype == np.uint8:
        return "XR"
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if finite.size and sample.dtype.kind in "if" and float(finite.min()) < -500:
        return "CT"
    return "MR"


def open_image(path: str | Path, modality: str | None = None,
               limits: ReadLimits | None = None) -> MedicalImage:
    """Open any supported image or volume (see the module docstring).

    Args:
        path: ``.nii``/``.nii.gz``, ``.tif``/``.tiff``/``.ome.tif``, ``.png``/``.jpg``/``.jpeg``/
            ``.bmp``, a zarr store (plain array, OME-Zarr multiscales, a cohort case group), or
            DICOM: a file (its series), a folder or tree holding one series
            (:func:`segmote_core.io.dicom.open_dicom`).
        modality: overrides the guess (:func:`guess_modality`).
        limits: size budgets checked from the header before any pixel is read (default: the
            environment's ``SEGMOTE_MAX_SLICE_MB`` / ``SEGMOTE_MAX_VOLUME_MB`` or 1 / 32 GiB).
    Returns:
        :class:`MedicalImage` with ``data`` ``(Z, Y, X)`` (dask), ``(Y, X)`` or ``(Y, X, 3)``.
    Raises:
        FileNotFoundError: no such file.
        ImageReadError: unsupported, empty, corrupt, truncated, 4D, all-NaN input (names the file).
        ImageTypeError: a dtype that is not a real number (complex, structured RGB24, ...).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    fmt = image_format(path)
    if fmt is None:
        raise ImageReadError(path, f"unsupported format; expected one of {', '.join(IMAGE_SUFFIXES)}")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    reader = {"nifti": _read_nifti, "tiff": _read_tiff, "pil": _read_pil, "zarr": _read_zarr,
              "dicom": _read_dicom}[fmt]
    try:
        with read_limits(limits):
            img = reader(path)
    except (ImageReadError, FileNotFoundError):
        raise
    except Exception as exc:  # nibabel/tifffile/PIL/zarr raise many types for broken files
        raise ImageReadError(path, f"cannot read as {fmt} ({type(exc).__name__}: {exc})") from exc
    img = _validated(img, path)
    if modality:
        img.modality = str(modality)
    log.debug("opened %r", img)
    return img


# ---------------------------------------------------------------------------- helpers
def _squeeze_to(shape: tuple[int, ...], keep: int, path: Path, what: str) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond ``keep``; a real extra axis is an error."""
    shape = tuple(int(s) for s in shape)
    extra = shape[keep:]
    if any(s != 1 for s in extra):
        raise ImageReadError(path, f"{len(shape)}D {what} of shape {shape}: SegMoTE reads 2D "
                                   f"images and 3D volumes; split the extra axis "
                                   f"(time points or channels) into separate files first")
    return shape[:keep]


def _lazy_volume(source: Any, shape: tuple[int, int, int], dtype: np.dtype) -> Any:
    """A ``(Z, Y, X)`` dask array with one chunk per slice over an indexable ``source``."""
    import dask.array as da

    return da.from_array(source, chunks=(1, shape[1], shape[2]), asarray=True, lock=True,
                         meta=np.empty((0, 0, 0), dtype=dtype))


def _validated(img: MedicalImage, path: Path) -> MedicalImage:
    shape = img.shape
    if 0 in shape or len(shape) < 2:
        raise ImageReadError(path, f"image is empty (shape {shape})")
    check_image_dtype(img.data.dtype, path)
    if img.is_volume:
        zs = sorted({0, shape[0] // 2, shape[0] - 1})
        samples = {}
        for z in zs:
            try:
                samples[z] = np.asarray(img.data[z])
            except Exception as exc:
                raise ImageReadError(path, f"cannot read slice {z} of {shape[0]}: the file is "
                                           f"truncated or corrupt ({type(exc).__name__}: {exc})"
                                     ) from exc
        sample = samples[zs[len(zs) // 2]]
        if all(s.dtype.kind == "f" and not np.isfinite(s).any() for s in samples.values()):
            # the sampled slices hold nothing: look (one slice at a time) for any finite slice
            finite = next((z for z in range(shape[0]) if z not in samples
                           and np.isfinite(np.asarray(img.data[z])).any()), None)
            if finite is None:
                raise ImageReadError(path, f"all values of all {shape[0]} slices are NaN or "
                                           "infinite")
            sample = np.asarray(img.data[finite])
    else:
        sample = np.asarray(img.data)
        check_finite(sample, path)
    if img.modality == "":
        img.modality = guess_modality(sample, rgb=img.axes == "YXC", is_2d=not img.is_volume)
    return img


# ---------------------------------------------------------------------------- NIfTI
def _read_nifti(path: Path) -> MedicalImage:
    import nibabel as nib

    # keep_file_open: a .nii.gz read slice by slice in order only seeks forward (no re-inflate)
    nii = nib.load(str(path), keep_file_open=True)
    if not isinstance(nii, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(path, f"not a NIfTI image ({type(nii).__name__})")
    hdr = nii.header
    raw_shape = tuple(int(s) for s in nii.shape)
    check_image_dtype(hdr.get_data_dtype(), path)
    keep = 3 if len(raw_shape) >= 3 else 2
    shape = _squeeze_to(raw_shape, keep, path, "NIfTI image")
    if 0 in shape:
        raise ImageReadError(path, f"image is empty (shape {raw_shape})")
    check_size(path, shape[::-1], hdr.get_data_dtype(), "ZYX" if len(shape) == 3 else "YX")
    zooms = tuple(float(z) for z in hdr.get_zooms()[: len(shape)])
    affine = nifti_to_zyx_affine(nii.affine)
    meta = {"format": "nifti", "nifti_affine": np.asarray(nii.affine, float),
            "orientation": "".join(nib.aff2axcodes(nii.affine)),
            "sform_code": int(hdr["sform_code"]), "qform_code": int(hdr["qform_code"]),
            "xyzt_units": hdr.get_xyzt_units()}
    proxy = nii.dataobj
    if len(raw_shape) > len(shape):  # trailing singleton axes, e.g. (X, Y, Z, 1)
        proxy = SqueezedView(proxy, (slice(None),) * len(shape) + (0,) * (len(raw_shape) - keep),
                             dtype=hdr.get_data_dtype())
    if len(shape) == 2:  # (X, Y) -> (Y, X)
        data = np.asarray(proxy).T
        check_image_dtype(data.dtype, path)
        return MedicalImage(data, (zooms[1], zooms[0]), affine, "", "YX", str(path), meta)
    dtype = np.asarray(proxy[:1, :1, :1]).dtype  # scaled (scl_slope) dtype, not the on-disk one
    check_image_dtype(dtype, path)
    x, y, z = shape
    data = _lazy_volume(_Reversed(proxy, (z, y, x), dtype), (z, y, x), dtype)
    return MedicalImage(data, (zooms[2], zooms[1], zooms[0]), affine, "", "ZYX", str(path), meta)


class _Reversed:
    """View an ``(X, Y, Z)`` array proxy as ``(Z, Y, X)``; a slice reads only its own bytes."""

    def __init__(self, proxy: Any, shape: tuple[int, int, int], dtype: np.dtype) -> None:
        self.proxy, self.shape, self.dtype, self.ndim = proxy, shape, np.dtype(dtype), 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        return np.asarray(self.proxy[key[::-1]]).T


# ---------------------------------------------------------------------------- TIFF
def _tiff_spacing(tif: Any, axes: str) -> dict[str, float]:
    """Physical sizes from OME-XML or ImageJ metadata + resolution tags (mm assumed)."""
    out: dict[str, float] = {}
    if tif.is_ome and tif.ome_metadata:
        import tifffile

        try:
            ome = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (ome[0] if isinstance(ome, list) else ome)["Pixels"]
            for ax in "ZYX":
                if f"PhysicalSize{ax}" in pixels:  # OME's default unit is the micrometre
                    scale = unit_to_mm(pixels.get(f"PhysicalSize{ax}Unit", "\u00b5m"))
                    out[ax] = float(pixels[f"PhysicalSize{ax}"]) * scale
        except (KeyError, TypeError, ValueError) as exc:
            log.debug("no physical sizes in the OME metadata (%s)", exc)
    elif tif.is_imagej:
        ij = tif.imagej_metadata or {}
        scale = unit_to_mm(ij.get("unit"))  # no unit / "pixel": the numbers are taken as mm
        if "spacing" in ij:
            out["Z"] = float(ij["spacing"]) * scale
        page = tif.pages[0]
        for ax, tag in (("X", "XResolution"), ("Y", "YResolution")):
            t = page.tags.get(tag)
            if t is not None and t.value[0]:
                out[ax] = float(t.value[1]) / float(t.value[0]) * scale
    return out


def _read_tiff(path: Path) -> MedicalImage:
    import tifffile
    import zarr

    with tifffile.TiffFile(str(path)) as tif:
        if not tif.series:
            raise ImageReadError(path, "TIFF holds no image series")
        series = tif.series[0]
        shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
        sizes = _tiff_spacing(tif, axes)
    check_image_dtype(dtype, path)
    rgb = axes.endswith("S") or (len(shape) == 3 and shape[-1] in (3, 4) and "C" == axes[-1:])
    keep = len(shape)
    while keep > 2 and shape[keep - 1] == 1 and not rgb:  # trailing singleton axes
        keep -= 1
    lead = tuple(s for s in shape[: keep - (3 if rgb else 2)] if s != 1)
    spatial = (shape[keep - 3: keep - 1] if rgb else shape[keep - 2: keep])
    if len(lead) > 1:
        raise ImageReadError(path, f"TIFF series of shape {shape} (axes {axes}) has more than "
                                   f"one non-spatial axis; expected (Y, X), (Y, X, 3) or (Z, Y, X)")
    meta = {"format": "tiff", "tiff_axes": axes}
    check_size(path, (*lead, *spatial, *((3,) if rgb else ())), dtype,
               "ZYX" if lead else "YXC" if rgb else "YX")
    if not lead:  # 2D (grey or RGB): small enough to read now
        arr = np.asarray(tifffile.imread(str(path))).reshape(*spatial, *(shape[-1:] if rgb else ()))
        if rgb:
            arr = arr[..., :3]
        sp = (sizes.get("Y", 1.0), sizes.get("X", 1.0))
        return MedicalImage(arr, sp, spacing_affine(sp), "", "YXC" if rgb else "YX", str(path), meta)
    if rgb:
        raise ImageReadError(path, f"RGB TIFF stack of shape {shape}: SegMoTE volumes are grey "
                                   "(Z, Y, X); save RGB images one per file")
    z = lead[0]
    store = tifffile.imread(str(path), aszarr=True)
    arr = zarr.open(store, mode="r")
    if isinstance(arr, zarr.Group):  # pyramidal: level 0
        arr = arr["0"]
    if tuple(arr.shape) != (z, *spatial):  # singleton axes (e.g. ZCYX with C = 1) dropped
        arr = SqueezedView(arr, tuple(slice(None) if (s != 1 or i >= len(shape) - 2) else 0
                                      for i, s in enumerate(arr.shape)))
        if arr.shape != (z, *spatial):
            raise ImageReadError(path, f"TIFF series of shape {shape} (axes {axes}) is not a "
                                       "(Z, Y, X) stack")
    data = _lazy_volume(arr, (z, *spatial), dtype)
    sp = (sizes.get("Z", 1.0), sizes.get("Y", 1.0), sizes.get("X", 1.0))
    return MedicalImage(data, sp, spacing_affine(sp), "", "ZYX", str(path), meta)


# ---------------------------------------------------------------------------- PNG / JPEG
def _read_pil(path: Path) -> MedicalImage:
    from PIL import Image

    with _PIL_GUARD:
        # The size budget below (from the header, before decoding) replaces PIL's own
        # decompression-bomb guard, so that raising the budget also lets PIL open the file.
        guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(str(path))
        finally:
            Image.MAX_IMAGE_PIXELS = guard
    with im:
        width, height = im.size
        bands = len(im.getbands())
        item = {"I": 4, "F": 4}.get(im.mode, 2 if im.mode.startswith("I;16") else 1)
        check_size(path, (height, width, *((bands,) if bands > 1 else ())), f"u{item}",
                   "YXC" if bands > 1 else "YX")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()  # decodes now: a truncated or corrupt file fails here
            mode = im.mode
            if mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "1"):
                im = im.convert("RGB" if mode not in ("LA", "1") else "L")
            arr = np.asarray(im)
    rgb = arr.ndim == 3
    if rgb:
        arr = arr[..., :3]
    return MedicalImage(arr, (1.0, 1.0), spacing_affine((1.0, 1.0)), "", "YXC" if rgb else "YX",
                        str(path), {"format": "pil", "pil_mode": mode, "spacing_known": False})


# ---------------------------------------------------------------------------- DICOM
def _read_dicom(path: Path) -> MedicalImage:
    from .dicom import open_dicom

    return open_dicom(path)


# ---------------------------------------------------------------------------- zarr
def _read_zarr(path: Path) -> MedicalImage:
    from .zarr_image import read_zarr_image

    arr, spacing, affine, modality, axes, meta = read_zarr_image(path)
    check_size(path, tuple(arr.shape), arr.dtype, axes)
    if axes == "ZYX":
        data = _lazy_volume(arr, tuple(arr.shape), np.dtype(arr.dtype))
    else:
        data = np.asarray(arr[...])
    if spacing is None:
        spacing = (1.0,) * (3 if axes == "ZYX" else 2)
    if affine is None:
        affine = spacing_affine(spacing)
    return MedicalImage(data, tuple(float(s) for s in spacing), np.asarray(affine, float),
                        modality or "", axes, str(path), meta)
