"""The cohort format (docs/formats.md): one zarr v3 group per case, each with an ``image`` array in
chunks of whole slices and, optionally, ground-truth ``labels`` of the same shape.

```
cohort.zarr/              attrs {"segmote": {"kind": "cohort", "version": 1}}
  <case_id>/              attrs: modality, spacing, dataset, categories, source, ..., complete
    image                 (Z, Y, X) | (Y, X) | (Y, X, 3); attrs spacing (mm), affine (4x4,
                          voxel (z, y, x) -> world), modality
    labels                optional, integer ids, same spatial shape as image
```
A case is written slice by slice (a lazy volume is never loaded whole) and marked
``"complete": true`` last: readers skip cases whose flag is ``false`` (a write in progress or
interrupted); cases written by other tools without the flag are read as they are.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import CancelToken, ProgressCallback, report
from .image import ImageReadError, MedicalImage, check_image_dtype, spacing_affine

__all__ = ["COHORT_VERSION", "COHORT_KIND", "CohortError", "CohortNotFoundError", "Case",
           "Cohort", "create_cohort", "write_case", "open_cohort", "valid_case_id", "slice_chunks",
           "RESERVED_NAMES", "missing_slices"]

log = logging.getLogger(__name__)

COHORT_VERSION = 1
COHORT_KIND = {"kind": "cohort", "version": COHORT_VERSION}
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: names a store keeps for itself (the batch report and review queue, the reviewers'
#: corrections folder, zarr's metadata, the lock and ingest report beside a store): never case
#: ids, whatever their case.
RESERVED_NAMES = frozenset({"report.parquet", "report.csv", "review_queue.csv",
                            "review_slices.csv", "corrections",
                            "zarr.json", ".zgroup", ".zarray", ".zattrs"})
_RESERVED_SUFFIXES = (".lock", ".ingest_report.csv")


class CohortError(ValueError):
    """A store that is not a cohort, or a malformed or missing case in one."""


class CohortNotFoundError(CohortError, FileNotFoundError):
    """No cohort at that path."""


def slice_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of whole slices: ``(1, Y, X)`` for volumes, the whole image for 2D / RGB."""
    if len(shape) == 3 and shape[-1] not in (3, 4):
        return (1, int(shape[1]), int(shape[2]))
    return tuple(int(s) for s in shape)


def valid_case_id(case_id: str) -> str:
    """Check a case id: letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit; not
    one of :data:`RESERVED_NAMES` (nor ending ``.lock``). Raises ValueError saying why."""
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise ValueError(f"invalid case id {case_id!r}: use letters, digits, '.', '_' and '-' "
                         "(at most 128, starting with a letter or digit)")
    low = case_id.lower()
    if low in RESERVED_NAMES or low.endswith(_RESERVED_SUFFIXES):
        raise ValueError(f"invalid case id {case_id!r}: the name is reserved for the store's "
                         f"own files (report, review queue, lock); rename the case")
    return case_id


def missing_slices(arr: Any, start: int, stop: int) -> list[int] | None:
    """Slices ``start..stop-1`` of a ``(Z, Y, X)`` zarr array (whole-slice chunks) whose chunk is
    not stored, or ``None`` when the store cannot be asked.

    Reading an absent chunk returns the fill value: zeros that look like data. Only meaningful
    for arrays whose every chunk was written (``attrs["all_chunks_stored"]``, set by
    :func:`write_case`); zarr otherwise skips chunks equal to the fill value."""
    from zarr.core.sync import sync

    try:
        outer = tuple(arr.shards or arr.chunks)
        keys = {}
        for z in range(start, stop):
            coord = (z // outer[0],) + (0,) * (arr.ndim - 1)
            keys.setdefault(coord, []).append(z)
        out = []
        for coord, zs in keys.items():
            key = f"{arr.path}/{arr.metadata.encode_chunk_key(coord)}".lstrip("/")
            if not sync(arr.store.exists(key)):
                out.extend(zs)
        return out
    except Exception as exc:  # noqa: BLE001 - a store that cannot say (v2 layouts, remote)
        log.debug("cannot check chunk presence of %s: %s", getattr(arr, "path", arr), exc)
        return None


def create_cohort(path: str | Path) -> Any:
    """Create an empty cohort, or open an existing one (idempotent); returns its zarr group.
    Raises :class:`CohortError` if ``path`` exists and is something else."""
    import zarr

    path = Path(path)
    if path.exists():
        return _cohort_root(path, mode="r+")
    root = zarr.open_group(str(path), mode="w-")
    root.attrs["segmote"] = dict(COHORT_KIND)
    log.info("created cohort %s", path)
    return root


def _cohort_root(path: Path, mode: str = "r") -> Any:
    import zarr

    if not path.exists():
        raise CohortNotFoundError(f"{path}: no such cohort")
    try:
        root = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for a foreign store
        raise CohortError(f"{path}: not a zarr group ({type(exc).__name__}: {exc})") from exc
    seg = dict(root.attrs).get("segmote") or {}
    if not isinstance(seg, dict):
        raise CohortError(f"{path / 'zarr.json'}: malformed attributes: 'segmote' is "
                          f"{seg!r}, expected {{'kind': 'cohort', 'version': ...}}")
    if seg.get("kind") != "cohort":
        raise CohortError(f"{path}: not a SegMoTE cohort (attrs['segmote']['kind'] is "
                          f"{seg.get('kind')!r}, expected 'cohort')")
    try:
        version = int(seg.get("version", 0))
    except (TypeError, ValueError):
        raise CohortError(f"{path / 'zarr.json'}: malformed attributes: segmote version "
                          f"{seg.get('version')!r} is not a number") from None
    if version > COHORT_VERSION:
        raise CohortError(f"{path}: cohort format version {seg.get('version')} is newer than "
                          f"this package reads ({COHORT_VERSION})")
    return root


def _slice_chunks(shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    return (1, *shape[1:]) if axes == "ZYX" else tuple(shape)


def _write_array(group: Any, name: str, data: Any, axes: str, where: str,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                 labels: bool = False) -> tuple[Any, int, list[int]]:
    """Copy ``data`` slice by slice; returns the array, the count of non-finite voxels and the
    slices holding no finite value. Every chunk is stored, also those equal to the fill value,
    so that a chunk file missing later is told apart from data (:func:`missing_slices`)."""
    shape = tuple(int(s) for s in data.shape)
    dtype = np.dtype(data.dtype)
    if dtype == np.float16:
        dtype = np.dtype(np.float32)
    arr = group.create_array(name, shape=shape, dtype=dtype, chunks=_slice_chunks(shape, axes),
                             fill_value=0, overwrite=True, config={"write_empty_chunks": True})
    nonfinite = 0
    empty: list[int] = []
    n = shape[0] if axes == "ZYX" else 1
    for z in range(n):
        part = np.asarray(data[z]) if axes == "ZYX" else np.asarray(data)
        if labels and part.size and part.min() < 0:
            raise ImageReadError(where, f"labels hold negative ids ({int(part.min())})")
        if not labels and part.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(part)))
            if bad == part.size:
                empty.append(z)
            nonfinite += bad
        if axes == "ZYX":
            arr[z] = part
        else:
            arr[...] = part
        report(progress, z + 1, n, cancel)
    if empty and len(empty) == n:  # a slice without data is accepted; an image without, not
        raise ImageReadError(where, "all values are NaN or infinite" if n == 1 else
                             f"all values of all {n} slices are NaN or infinite")
    arr.attrs["all_chunks_stored"] = True
    return arr, nonfinite, empty


def write_case(cohort: str | Path, case_id: str, image: Any, *,
               spacing: tuple[float, ...] | None = None, affine: np.ndarray | None = None,
               modality: str = "auto", labels: Any = None, attrs: dict[str, Any] | None = None,
               axes: str | None = None, overwrite: bool = True,
               progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None, source: str | Path | None = None) -> None:
    """Write (or rewrite) one case: ``image`` and optional ``labels``, then ``complete = True``.

    Each write gets a new ``write_stamp`` (random, in the case attrs, set with ``complete``):
    what made from the case (batch labels) records it, so a rewritten case is never taken for
    the one it replaced. Slices holding no finite value are accepted (listed as
    ``empty_slices``); an image with no finite value at all is refused.

    Args:
        image: ``(Z, Y, X)``, ``(Y, X)`` or ``(Y, X, 3)`` array-like (numpy, dask, zarr).
        spacing: mm per spatial axis, same order as ``image`` (default 1 mm).
        affine: ``(4, 4)`` voxel ``(z, y, x)`` -> world; default a diagonal from ``spacing``.
        labels: integer ids with the image's spatial shape.
        attrs: extra case attributes (``dataset``, ``categories``, ``patient``, ``source``...).
        axes: ``"ZYX"``, ``"YX"`` or ``"YXC"``; inferred from the shape when omitted.
        overwrite: replace an existing case (its old arrays and attrs go); else raise.
        progress: ``progress(done_slices, total_slices)``; ``cancel`` stops between slices
            (the case stays ``complete: false``).
        source: the file the image was read from, named in errors about its content.
    Raises:
        ValueError / ImageReadError / ImageTypeError: the message names the case and the problem.
    """
    valid_case_id(case_id)
    root = _cohort_root(Path(cohort), mode="r+")
    where = f"{cohort}/{case_id}"
    content = f"{source} (case {where})" if source else where
    shape = tuple(int(s) for s in image.shape)
    if axes is None:
        rgb = len(shape) == 3 and shape[-1] == 3 and (spacing is None or len(spacing) == 2)
        axes = {2: "YX", 3: "YXC" if rgb else "ZYX"}.get(len(shape))
    if axes not in ("ZYX", "YX", "YXC") or len(shape) != len(axes):
        raise ImageReadError(where, f"image of shape {shape} is not (Z, Y, X), (Y, X) or (Y, X, 3)")
    if 0 in shape:
        raise ImageReadError(where, f"image is empty (shape {shape})")
    check_image_dtype(image.dtype, where)
    spatial = shape[:2] if axes == "YXC" else shape
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * len(spatial)))
    if len(spacing) != len(spatial) or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ImageReadError(where, f"spacing {spacing} does not fit spatial shape {spatial}")
    affine = spacing_affine(spacing) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ImageReadError(where, f"affine has shape {affine.shape}, expected (4, 4)")
    if labels is not None:
        if tuple(labels.shape) != tuple(spatial):
            raise ImageReadError(where, f"labels shape {tuple(labels.shape)} differs from the "
                                        f"image's spatial shape {spatial}")
        if np.dtype(labels.dtype).kind not in "biu":
            raise ImageReadError(where, f"labels have dtype {labels.dtype}; expected integer ids")
    if case_id in root:
        if not overwrite:
            raise CohortError(f"{where}: case exists (pass overwrite=True to replace it)")
        del root[case_id]
    group = root.create_group(case_id)
    group.attrs.update({"complete": False})
    try:
        arr, nonfinite, empty = _write_array(group, "image", image, axes, content, progress,
                                             cancel)
        arr.attrs.update({"spacing": list(spacing), "affine": affine.tolist(),
                          "modality": str(modality), "axes": axes})
        if labels is not None:
            _write_array(group, "labels", labels, "ZYX" if axes == "ZYX" else "YX", where,
                         cancel=cancel, labels=True)
    except BaseException:
        group.attrs.update({"complete": False})
        raise
    extra = dict(attrs or {})
    group.attrs.update({**extra, "modality": str(modality), "spacing": list(spacing),
                        "nonfinite_voxels": nonfinite, "empty_slices": empty,
                        "write_stamp": f"{time.time():.6f}-{secrets.token_hex(8)}",
                        "complete": True})
    if nonfinite:
        log.warning("%s: %d NaN/inf voxels (kept; normalisation ignores them)%s", content,
                    nonfinite, f"; slices {empty} hold no finite value (segmented as empty)"
                    if empty else "")
    log.info("wrote case %s %s", where, shape)


@dataclass
class Case:
    """One case of a cohort. ``image``/``labels`` are zarr arrays (read slice by slice)."""

    case_id: str
    image: Any
    labels: Any
    spacing: tuple[float, ...]
    affine: np.ndarray
    modality: str
    attrs: dict[str, Any]
    source: str

    @property
    def axes(self) -> str:
        return str(self.image.attrs.get("axes") or ("ZYX" if len(self.spacing) == 3 else
                                                    "YXC" if self.image.ndim == 3 else "YX"))

    def input_signature(self, arrays: tuple[str, ...] = ("image",)) -> dict[str, Any]:
        """What identifies this version of the case, for outputs made from it to record.

        The case's ``write_stamp`` (new at every :func:`write_case`) when it has one, else (a
        cohort written by another tool) a sha256 of the data of ``arrays``, read slice by slice.
        """
        stamp = self.attrs.get("write_stamp")
        if isinstance(stamp, str) and stamp:
            return {"write_stamp": stamp}
        from ..cache import data_signature

        group = {"image": self.image, "labels": self.labels}
        out: dict[str, Any] = {}
        for name in arrays:
            arr = group.get(name)
            if arr is None:
                import zarr

                arr = zarr.open_group(str(Path(self.source).parent), mode="r")[
                    f"{self.case_id}/{name}"]
            out[f"{name}_sha256"] = data_signature(arr)
        return out

    def as_image(self) -> MedicalImage:
        """The case as a :class:`MedicalImage` (a lazy dask volume, or numpy for 2D)."""
        import dask.array as da

        if self.axes == "ZYX":
            data = da.from_array(self.image, chunks=(1, *self.image.shape[1:]))
        else:
            data = np.asarray(self.image[...])
        return MedicalImage(data, self.spacing, self.affine, self.modality, self.axes, self.source,
                            {"format": "cohort", "case_id": self.case_id})


class Cohort:
    """A read-only view of a cohort store (:func:`open_cohort`).

    Raises:
        CohortNotFoundError: no such path; CohortError: not a cohort.
    """

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        self.root = _cohort_root(self.path, mode=mode)

    def case_ids(self, include_incomplete: bool = False) -> list[str]:
        """Sorted ids; cases whose ``complete`` flag is ``false`` are left out unless asked."""
        ids = []
        for name, group in self.root.groups():
            if include_incomplete or dict(group.attrs).get("complete", True) is not False:
                ids.append(name)
        return sorted(ids)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self.case_ids()

    def __len__(self) -> int:
        return len(self.case_ids())

    def case(self, case_id: str) -> Case:
        where = f"{self.path}/{case_id}"
        if case_id not in self.root:
            raise CohortError(f"{self.path}: no case {case_id!r}")
        group = self.root[case_id]
        if "image" not in group:
            raise CohortError(f"{where}: case has no 'image' array")
        image = group["image"]
        try:
            return self._case(case_id, group, image, where)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise CohortError(f"{where}: malformed attributes in its zarr.json "
                              f"({type(exc).__name__}: {exc}); expected spacing (numbers), "
                              f"affine (4 x 4), modality (text)") from exc

    def _case(self, case_id: str, group: Any, image: Any, where: str) -> Case:
        gattrs, iattrs = dict(group.attrs), dict(image.attrs)
        spacing_raw = iattrs.get("spacing", gattrs.get("spacing"))
        if spacing_raw is not None and (isinstance(spacing_raw, str) or not all(
                isinstance(v, (int, float)) for v in spacing_raw)):
            raise ValueError(f"spacing {spacing_raw!r} is not a list of numbers")
        ndim_spatial = 2 if image.ndim == 2 or (image.ndim == 3 and iattrs.get("axes") == "YXC")\
            else 3
        if image.ndim == 3 and spacing_raw is not None and len(spacing_raw) == 2:
            ndim_spatial = 2
        spacing = tuple(float(s) for s in (spacing_raw or (1.0,) * ndim_spatial))
        affine = iattrs.get("affine", gattrs.get("affine"))
        affine = spacing_affine(spacing) if affine is None else np.asarray(affine, float)
        if affine.shape != (4, 4):
            raise ValueError(f"affine has shape {affine.shape}")
        modality = str(iattrs.get("modality") or gattrs.get("modality") or "auto")
        labels = group["labels"] if "labels" in group else None
        return Case(case_id, image, labels, spacing, affine, modality, gattrs, where)

    def __iter__(self):
        return (self.case(c) for c in self.case_ids())


def open_cohort(path: str | Path) -> Cohort:
    """Open a cohort read-only. Raises :class:`CohortNotFoundError` (also a
    ``FileNotFoundError``) or :class:`CohortError`, naming the path."""
    return Cohort(path, mode="r")
