"""Reading one image out of a zarr store: a plain array, an OME-Zarr (NGFF 0.4/0.5) multiscale
image, a cohort case group (``image``) or a labels group written by :func:`write_labels`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .image import ImageReadError, SqueezedView, unit_to_mm

__all__ = ["read_zarr_image", "ngff_multiscales"]


def ngff_multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ``multiscales`` list of an OME-Zarr group (NGFF 0.4 top level, 0.5 under ``ome``)."""
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def _axes_of(shape: tuple[int, ...], path: Path) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[-1] == 3:
        return "YXC"  # (Y, X, 3): RGB (a 3-slice volume would be stored as (3, Y, X))
    if len(shape) == 3:
        return "ZYX"
    raise ImageReadError(path, f"array of shape {shape}: expected (Y, X), (Y, X, 3) or (Z, Y, X)")


def _from_ngff(group: Any, ms: list[dict[str, Any]], path: Path):
    scale0 = ms[0]
    ds = scale0["datasets"][0]
    arr = group[ds["path"]]
    axes_meta = scale0.get("axes", [])
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    units = [unit_to_mm(a.get("unit")) if isinstance(a, dict) else 1.0 for a in axes_meta]
    if not axes:
        axes = ["t", "c", "z", "y", "x"][-arr.ndim:]
    scale = [1.0] * arr.ndim
    for tr in ds.get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale = [float(s) for s in tr["scale"]]
    keep = [i for i, a in enumerate(axes) if a.lower() in ("z", "y", "x")]
    drop = [i for i in range(arr.ndim) if i not in keep]
    if any(arr.shape[i] != 1 for i in drop):
        raise ImageReadError(path, f"OME-Zarr image of shape {tuple(arr.shape)} (axes "
                                   f"{''.join(axes)}) has a non-spatial axis longer than 1")
    if drop:
        index = tuple(0 if i in drop else slice(None) for i in range(arr.ndim))
        arr = SqueezedView(arr, index)
    spacing = tuple(scale[i] * (units[i] if i < len(units) else 1.0) for i in keep)
    return arr, spacing, None, None, "ZYX" if len(keep) == 3 else "YX", {"format": "ome-zarr"}


def read_zarr_image(path: Path):
    """-> ``(array, spacing | None, affine | None, modality | None, axes, meta)``."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except FileNotFoundError as exc:  # zarr's NodeNotFoundError: a folder with no zarr metadata
        raise ImageReadError(path, "not a zarr store (no zarr.json, .zarray or .zgroup)") from exc
    meta: dict[str, Any] = {"format": "zarr"}
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        kind = (attrs.get("segmote") or {}).get("kind")
        if kind == "cohort":
            raise ImageReadError(path, "this zarr is a cohort of several cases: open one case "
                                       "(<cohort>/<case_id>) or use open_cohort()")
        ms = ngff_multiscales(attrs)
        if ms is not None:
            return _from_ngff(node, ms, path)
        names = {n for n, _ in node.arrays()}
        name = next((n for n in ("image", "labels") if n in names), None)
        if name is None:
            raise ImageReadError(path, f"zarr group holds no 'image' or 'labels' array and no "
                                       f"OME-Zarr multiscales (arrays: {sorted(names)})")
        arr = node[name]
        meta["array"] = name
        group_attrs = attrs
    else:
        arr, group_attrs = node, {}
    a = {**group_attrs, **dict(arr.attrs)}
    axes = _axes_of(tuple(arr.shape), path)
    spacing = tuple(float(s) for s in a["spacing"]) if a.get("spacing") is not None else None
    if spacing is not None and len(spacing) != (3 if axes == "ZYX" else 2):
        raise ImageReadError(path, f"attrs spacing {spacing} does not fit an array of shape "
                                   f"{tuple(arr.shape)}")
    affine = np.asarray(a["affine"], float) if a.get("affine") is not None else None
    if affine is not None and affine.shape != (4, 4):
        raise ImageReadError(path, f"attrs affine has shape {affine.shape}, expected (4, 4)")
    return arr, spacing, affine, a.get("modality"), axes, meta
