"""Label writers: NIfTI (with the source affine, so labels overlay the image in ITK-SNAP and
3D Slicer), zarr, TIFF and PNG. Every write goes through :mod:`segmote_core.fileio` (temporary
name, fsync, rename), so a crash never leaves a half-written file under the final name; writing
over the source image itself is refused."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write, atomic_write_dir
from .image import MedicalImage, nifti_to_zyx_affine, spacing_affine, zyx_to_nifti_affine

__all__ = ["write_labels", "LABEL_SUFFIXES"]

log = logging.getLogger(__name__)

LABEL_SUFFIXES = (".nii.gz", ".nii", ".zarr", ".tif", ".tiff", ".png")


def _check_labels(labels: Any, path: Path) -> Any:
    if not hasattr(labels, "dtype"):
        labels = np.asarray(labels)
    dtype = np.dtype(labels.dtype)
    if dtype == np.bool_:
        if not isinstance(labels, np.ndarray) and not hasattr(labels, "map_blocks"):
            import dask.array as da  # zarr and other array-likes: convert lazily

            labels = da.from_array(labels, chunks=(1, *labels.shape[1:]) if labels.ndim == 3
                                   else labels.shape)
        return labels.astype(np.uint8)
    if dtype.kind not in "iu":
        raise TypeError(f"{path}: labels must be integers or bool, got dtype {dtype}")
    if labels.ndim not in (2, 3) or 0 in labels.shape:
        raise ValueError(f"{path}: labels must be (Y, X) or (Z, Y, X), got shape {labels.shape}")
    return labels


def write_labels(labels: Any, path: str | Path, like: MedicalImage | None = None, *,
                 affine: np.ndarray | None = None, spacing: tuple[float, ...] | None = None,
                 modality: str | None = None, attrs: dict[str, Any] | None = None) -> Path:
    """Write a label image next to (never over) its source.

    Args:
        labels: ``(Z, Y, X)`` or ``(Y, X)`` integer or bool array (numpy, dask or zarr).
        path: output, by suffix one of :data:`LABEL_SUFFIXES`.
        like: the source image; supplies affine, spacing, modality and NIfTI header codes.
        affine: ``(4, 4)`` voxel ``(z, y, x)`` -> world (overrides ``like``).
        spacing: mm, same axis order as ``labels`` (overrides ``like``).
        attrs: extra attributes (zarr only).
    Returns:
        The written path.
    Raises:
        ValueError: unknown suffix, shape differing from ``like``, output == source, PNG of a volume.
        TypeError: non-integer labels.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(LABEL_SUFFIXES):
        raise ValueError(f"{path}: unsupported label format; use one of {LABEL_SUFFIXES}")
    labels = _check_labels(labels, path)
    if like is not None:
        spatial = like.shape[:2] if like.axes == "YXC" else like.shape
        if tuple(labels.shape) != tuple(spatial):
            raise ValueError(f"{path}: labels shape {tuple(labels.shape)} differs from the source "
                             f"image {like.source} shape {tuple(spatial)}")
        if Path(like.source).resolve() == path.resolve():
            raise ValueError(f"{path}: refusing to overwrite the source image with labels")
    if spacing is None:
        spacing = like.spacing if like is not None else (1.0,) * labels.ndim
    spacing = tuple(float(s) for s in spacing)[-labels.ndim:]
    if affine is None:
        affine = like.affine if like is not None else spacing_affine(spacing)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be (4, 4), got {affine.shape}")
    if modality is None and like is not None:
        modality = like.modality
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith((".nii", ".nii.gz")):
        # nibabel picks the format from the name: the temporary name keeps the suffix
        atomic_write(path, lambda tmp: _write_nifti(labels, Path(tmp), affine, like),
                     suffix=".tmp.nii.gz" if name.endswith(".gz") else ".tmp.nii")
    elif name.endswith(".zarr"):
        atomic_write_dir(path, lambda tmp: _write_zarr(labels, Path(tmp), spacing, affine,
                                                       modality, like, attrs or {}))
    elif name.endswith((".tif", ".tiff")):
        atomic_write(path, lambda tmp: _write_tiff(np.asarray(labels), Path(tmp), spacing))
    else:
        atomic_write(path, lambda tmp: _write_png(np.asarray(labels), Path(tmp), path))
    log.info("wrote labels %s to %s", tuple(labels.shape), path)
    return path


def _write_nifti(labels: Any, tmp: Path, affine: np.ndarray, like: MedicalImage | None) -> None:
    import nibabel as nib

    data = np.asarray(labels)
    data = data.transpose(2, 1, 0) if data.ndim == 3 else data.T     # (Z, Y, X) -> (X, Y, Z)
    nifti_affine = zyx_to_nifti_affine(affine)
    img = nib.Nifti1Image(data, nifti_affine)
    meta = like.meta if like is not None else {}
    sform_code = int(meta.get("sform_code", 2)) or 0
    qform_code = int(meta.get("qform_code", 0))
    if meta.get("format") == "nifti" and np.allclose(meta.get("nifti_affine"), nifti_affine):
        img.set_sform(nifti_affine, code=sform_code)
        img.set_qform(nifti_affine, code=qform_code)
    img.header.set_xyzt_units(*(meta.get("xyzt_units") or ("mm", "sec")))
    img.header["descrip"] = b"segmote labels"
    img.set_data_dtype(data.dtype)
    nib.save(img, str(tmp))


def _write_zarr(labels: Any, tmp: Path, spacing: tuple[float, ...], affine: np.ndarray,
                modality: str | None, like: MedicalImage | None, attrs: dict[str, Any]) -> None:
    import zarr

    root = zarr.open_group(str(tmp), mode="w")
    root.attrs["segmote"] = {"kind": "labels", "version": 1}
    chunks = (1, *labels.shape[1:]) if labels.ndim == 3 else tuple(labels.shape)
    arr = root.create_array("labels", shape=tuple(labels.shape), dtype=labels.dtype, chunks=chunks,
                            fill_value=0)
    if labels.ndim == 3:
        for z in range(labels.shape[0]):  # slice by slice: a lazy input stays lazy
            arr[z] = np.asarray(labels[z])
    else:
        arr[...] = np.asarray(labels)
    arr.attrs.update({"spacing": list(spacing), "affine": affine.tolist(),
                      "modality": modality, "source": like.source if like is not None else None,
                      **attrs})


def _write_tiff(labels: np.ndarray, tmp: Path, spacing: tuple[float, ...]) -> None:
    import tifffile

    sy, sx = spacing[-2:]
    kwargs: dict[str, Any] = {"resolution": (1.0 / sx, 1.0 / sy)}
    if labels.dtype in (np.uint8, np.uint16):
        meta: dict[str, Any] = {"axes": "ZYX" if labels.ndim == 3 else "YX", "unit": "mm"}
        if labels.ndim == 3:
            meta["spacing"] = spacing[0]
        tifffile.imwrite(str(tmp), labels, imagej=True, metadata=meta, **kwargs)
    else:
        tifffile.imwrite(str(tmp), labels, metadata={"axes": "ZYX" if labels.ndim == 3 else "YX"},
                         **kwargs)


def _write_png(labels: np.ndarray, tmp: Path, path: Path) -> None:
    from PIL import Image

    if labels.ndim != 2:
        raise ValueError(f"{path}: PNG holds 2D labels only, got shape {labels.shape}; use "
                         ".nii.gz, .zarr or .tif for volumes")
    if labels.max(initial=0) > 65535 or labels.min(initial=0) < 0:
        raise ValueError(f"{path}: label ids outside 0..65535 do not fit a PNG")
    out = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
    Image.fromarray(out).save(str(tmp), format="PNG")


# kept importable for callers converting affines themselves
__all__ += ["nifti_to_zyx_affine", "zyx_to_nifti_affine"]
