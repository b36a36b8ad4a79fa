"""DICOM series -> :class:`MedicalImage` (pydicom): discovery, grouping, geometry, lazy pixels.

- A file, a folder or a tree is scanned for DICOM files (the ``DICM`` marker, or a ``.dcm`` /
  ``.dicom`` / ``.ima`` name); headers are read without pixel data and grouped by
  SeriesInstanceUID: one series is one image (one case).
- Slices (files, or the frames of an enhanced multi-frame file) are ordered by their position
  along the slice normal (the cross product of ImageOrientationPatient's row and column
  cosines), never by file name or InstanceNumber.
- The affine maps voxel ``(z, y, x)`` to world RAS+ mm like the NIfTI reader's: DICOM's LPS
  patient coordinates with x and y negated, so a series and a dcm2niix conversion of it give
  every voxel the same world position.
- Pixels are decoded one slice at a time (a lazy dask volume), RescaleSlope/Intercept applied
  (CT in HU), MONOCHROME1 inverted so that high values are bright.

Nothing patient-identifying is read into :attr:`MedicalImage.meta` except the UIDs needed to
write DICOM-SEG back (``meta["dicom_uids"]``; ingest stores them only with ``keep_uids``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .dicom_geometry import SeriesGeometry, dicom_window, series_geometry
from .image import ImageReadError, MedicalImage, check_size, spacing_affine

__all__ = ["DICOM_SUFFIXES", "DicomSeries", "is_dicom_file", "find_dicom_files", "scan_dicom",
           "read_series", "open_dicom", "holds_dicom", "dicom_case_id", "dicom_modality"]

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
# objects that carry no image to segment (structured reports, RT objects, presentation
# states, key objects, segmentations, registrations, documents, waveforms)
_NON_IMAGE = {"SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "RTIMAGE", "KO", "PR", "SEG",
              "REG", "DOC", "ECG", "HD", "AU", "FID", "PLAN", "RWV", "RESP"}
_LOCALIZER = ("LOCALIZER", "SCOUT", "SURVEY")
#: DICOM Modality codes -> the project's modality names (others are kept as they are)
_MODALITY = {"CT": "CT", "MR": "MR", "PT": "PET", "NM": "NM", "US": "US", "CR": "XR",
             "DX": "XR", "DR": "XR", "RG": "XR", "RF": "XR", "XA": "XR", "MG": "XR", "PX": "XR",
             "IO": "XR", "XC": "DERM"}


def dicom_modality(code: str) -> str:
    """The project's modality name for a DICOM Modality code (``CR``/``DX``/``MG`` -> ``XR``,
    ``PT`` -> ``PET``, ``XC`` (external camera, dermatology) -> ``DERM``); ``""`` if empty."""
    code = str(code or "").strip().upper()
    return _MODALITY.get(code, code)


def dicom_case_id(study_uid: str, series_uid: str) -> str:
    """A case id derived from the Study/SeriesInstanceUID (one-way hash, no patient data)."""
    digest = hashlib.sha256(f"{study_uid}\\{series_uid}".encode()).hexdigest()
    return f"dcm-{digest[:16]}"


def is_dicom_file(path: str | Path) -> bool:
    """True for a regular file with the ``DICM`` marker at byte 128, or a DICOM-like name."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES) or path.name.upper() == "DICOMDIR":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not d.lower().endswith(".zarr"))
        yield from (p for p in (Path(dirpath) / f for f in sorted(filenames)) if is_dicom_file(p))


def holds_dicom(root: str | Path) -> bool:
    """True when a folder (or any folder under it) holds a DICOM file; stops at the first."""
    return next(iter(_walk(Path(root))), None) is not None


def find_dicom_files(root: str | Path) -> list[Path]:
    """DICOM files at ``root`` (a file) or anywhere under it; zarr stores and hidden entries are
    not entered. Sorted by path (the order is only for reproducible reports)."""
    root = Path(root)
    if root.is_file():
        return [root] if is_dicom_file(root) else []
    return list(_walk(root))


@dataclass
class DicomSeries:
    """The files of one SeriesInstanceUID (headers only, no pixels yet).

    ``status`` is ``"image"`` (readable with :func:`read_series`), ``"ignored"`` (a DICOMDIR, a
    non-image object, localizers only) or ``"failed"`` (unreadable files); ``reason`` says why
    (``where`` names the file or folder it is about).
    """

    series_uid: str
    study_uid: str
    files: list[Path] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "image"
    reason: str = ""
    case_id: str = ""

    @property
    def where(self) -> Path:
        """The file a problem is about (a single-file entry), else the series folder."""
        return self.files[0] if len(self.files) == 1 else self.path

    @property
    def path(self) -> Path:
        """The folder holding the series' files (their common parent)."""
        if not self.files:
            return Path(".")
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))

    def signature(self) -> list[Any]:
        """A digest of the files' paths, sizes and modification times (rerun detection)."""
        h = hashlib.sha256()
        for p in sorted(self.files):
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return [len(self.files), h.hexdigest()]


def _read_header(path: Path) -> Any:
    """The dataset without pixel data; ``_segmote_pixel_offset`` records where pixels start."""
    import pydicom

    force = not path.name.upper() == "DICOMDIR"
    with open(path, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=force)
        offset = fh.tell()
    if "SOPClassUID" not in ds and "MediaStorageSOPClassUID" not in getattr(ds, "file_meta", {}):
        raise ImageReadError(path, "not a DICOM file (no SOP class)")
    ds._segmote_pixel_offset = offset
    return ds


def _sop_class(ds: Any) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")
    return str(uid)


def _non_image_reason(ds: Any) -> str:
    from pydicom.uid import UID

    sop = _sop_class(ds)
    modality = str(ds.get("Modality", "")).upper()
    name = UID(sop).name if sop else "unknown SOP class"
    if sop == _DICOMDIR_SOP:
        return "a DICOMDIR index (its images are read from the tree itself)"
    if modality in _NON_IMAGE or "Rows" not in ds or "Segmentation" in name:
        return f"not an image: {name} ({modality or 'no modality'})"
    return ""


def _cut_before_pixels(path: Path, ds: Any) -> bool:
    """An image SOP class whose header read ran to the end of the file (pydicom stops quietly
    at a cut inside the header): the pixel data, and maybe Rows/Columns, are missing."""
    from pydicom.uid import UID

    sop = _sop_class(ds)
    if "Image Storage" not in (UID(sop).name if sop else ""):
        return False
    return int(ds._segmote_pixel_offset) >= path.stat().st_size


def _is_localizer(ds: Any) -> bool:
    kinds = [str(v).upper() for v in (ds.get("ImageType") or ds.get("FrameType") or [])]
    return any(k in _LOCALIZER for k in kinds)


def scan_dicom(paths: Iterable[str | Path]) -> list[DicomSeries]:
    """Group DICOM files by SeriesInstanceUID (reads headers only).

    Every file ends up in exactly one returned :class:`DicomSeries`: image series (localizer
    images dropped with a note), ignored objects (DICOMDIR, SR, RTSTRUCT, SEG, ...) and, one
    per file, unreadable files (``status="failed"``, ``reason`` naming the problem).
    """
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise ImportError("reading DICOM needs pydicom: pip install 'segmote[dicom]'") from None
    groups: dict[tuple[str, str], DicomSeries] = {}
    out: list[DicomSeries] = []
    for path in (Path(p) for p in paths):
        try:
            ds = _read_header(path)
        except Exception as exc:  # pydicom raises many types for broken files
            out.append(DicomSeries("", "", [path], status="failed", case_id=_file_case_id(path),
                                   reason=f"unreadable DICOM ({type(exc).__name__}: {exc})"))
            continue
        if _cut_before_pixels(path, ds):
            out.append(DicomSeries(str(ds.get("SeriesInstanceUID", "")), "", [path],
                                   status="failed", case_id=_file_case_id(path),
                                   reason="truncated: the file ends before its pixel data"))
            continue
        reason = _non_image_reason(ds)
        series_uid, study_uid = str(ds.get("SeriesInstanceUID", "")), str(
            ds.get("StudyInstanceUID", ""))
        if reason:
            ign = DicomSeries(series_uid, study_uid, [path], status="ignored", reason=reason)
            ign.case_id = (dicom_case_id(study_uid, series_uid) if series_uid
                           else _file_case_id(path))
            out.append(ign)
            continue
        if not series_uid:
            out.append(DicomSeries("", study_uid, [path], status="failed",
                                   case_id=_file_case_id(path),
                                   reason="image without SeriesInstanceUID"))
            continue
        key = (study_uid, series_uid)
        if key not in groups:
            groups[key] = DicomSeries(series_uid, study_uid,
                                      case_id=dicom_case_id(study_uid, series_uid))
        groups[key].files.append(path)
        groups[key].headers.append(ds)
    by_uid = {k[1]: g for k, g in groups.items()}
    for bad in [b for b in out if b.status == "failed" and b.series_uid in by_uid]:
        # a damaged file whose series is known fails that series (not a gap further on)
        g = by_uid[bad.series_uid]
        g.status, g.reason = "failed", f"{bad.files[0].name}: {bad.reason}"
        out.remove(bad)
    for s in groups.values():
        scouts = [i for i, ds in enumerate(s.headers) if _is_localizer(ds)]
        if scouts:
            note = f"{len(scouts)} localizer/scout image(s) skipped"
            if len(scouts) == len(s.files):
                s.status, s.reason = "ignored", "localizer/scout series skipped"
            else:
                s.notes.append(note)
                keep = [i for i in range(len(s.files)) if i not in set(scouts)]
                s.files = [s.files[i] for i in keep]
                s.headers = [s.headers[i] for i in keep]
            log.info("%s: %s", s.case_id, note)
        out.append(s)
    return out


def _file_case_id(path: Path) -> str:
    return "file-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- pixels
class _SliceSource:
    """An indexable ``(Z, Y, X)`` view of the sorted frames; a slice decodes only its frame."""

    def __init__(self, geom: SeriesGeometry, dtype: np.dtype) -> None:
        self.geom, self.dtype, self.ndim = geom, np.dtype(dtype), 3
        self.shape = (len(geom.frames), geom.rows, geom.cols)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        zs = range(self.shape[0])[key[0]] if key else range(self.shape[0])
        rest = key[1:]
        if isinstance(zs, int):
            return read_frame(self.geom, zs, self.dtype)[rest]
        stack = [read_frame(self.geom, z, self.dtype) for z in zs]
        arr = np.stack(stack) if stack else np.empty((0, *self.shape[1:]), self.dtype)
        return arr[(slice(None), *rest)]


def read_frame(geom: SeriesGeometry, z: int, dtype: Any) -> np.ndarray:
    """Slice ``z`` in the sorted order, decoded, MONOCHROME1 inverted, rescaled, as ``dtype``."""
    from pydicom.pixels import pixel_array

    fr = geom.frames[z]
    try:
        arr = pixel_array(str(fr.path), index=fr.index)
    except Exception as exc:  # truncated data, missing decoder, corrupt stream
        raise ImageReadError(fr.path, f"cannot decode the pixel data of slice {z} "
                                      f"({geom.transfer_syntax_name}): the file is truncated or "
                                      f"corrupt ({type(exc).__name__}: {exc})") from exc
    want = (geom.rows, geom.cols, 3) if geom.rgb else (geom.rows, geom.cols)
    if arr.shape != want:
        raise ImageReadError(fr.path, f"pixel data of shape {arr.shape}, expected {want}")
    if geom.monochrome1:
        arr = (geom.stored_range[1] + geom.stored_range[0]) - arr.astype(np.int64)
    if fr.slope != 1.0 or fr.intercept != 0.0:
        arr = arr.astype(np.float64) * fr.slope + fr.intercept
    return arr.astype(dtype, copy=False)


def read_series(series: DicomSeries, modality: str | None = None) -> MedicalImage:
    """One series as a :class:`MedicalImage` (lazy ``(Z, Y, X)``, or 2D ``(Y, X)`` / RGB).

    Raises:
        ImageReadError: naming the file (or series folder) and the problem: mixed sizes or
            orientations, duplicate or missing slices (uneven spacing), frames without
            positions, compressed pixel data without an installed decoder, truncated files.
    """
    from .readers import _lazy_volume, guess_modality

    if series.status != "image":
        raise ImageReadError(series.where, series.reason)
    geom = series_geometry(series.files, series.headers, series.path)
    dtype = geom.dtype
    n = len(geom.frames)
    check_size(series.where, (geom.rows, geom.cols, 3) if geom.rgb and n == 1 else
               (n, geom.rows, geom.cols) if n > 1 else (geom.rows, geom.cols), dtype,
               "ZYX" if n > 1 else "YXC" if geom.rgb else "YX")
    first = series.headers[0]
    meta: dict[str, Any] = {
        "format": "dicom", "window": dicom_window(first, geom),
        "dicom": geom.summary(n_files=len(series.files), notes=series.notes),
        "dicom_uids": geom.uids(first),
        "dicom_frames": [(str(f.path), f.index) for f in geom.frames],
        "case_id": series.case_id, "spacing_known": geom.spacing_known}
    if len(geom.frames) == 1:
        data = read_frame(geom, 0, dtype)
        axes = "YXC" if geom.rgb else "YX"
        spacing = geom.spacing[1:]
        affine = geom.affine if geom.positioned else spacing_affine(spacing)
    else:
        if geom.rgb:
            raise ImageReadError(series.path, f"an RGB series of {len(geom.frames)} slices: "
                                              "SegMoTE volumes are grey (Z, Y, X)")
        data = _lazy_volume(_SliceSource(geom, dtype), (len(geom.frames), geom.rows, geom.cols),
                            dtype)
        axes, spacing, affine = "ZYX", geom.spacing, geom.affine
    if geom.positioned:
        import nibabel as nib

        from .image import zyx_to_nifti_affine
        meta["orientation"] = "".join(nib.aff2axcodes(zyx_to_nifti_affine(affine)))
    mod = modality or dicom_modality(str(first.get("Modality", "")))
    if not mod or mod in ("OT", "SC"):
        sample = np.asarray(data if axes != "ZYX" else data[len(geom.frames) // 2])
        mod = guess_modality(sample, rgb=axes == "YXC", is_2d=axes != "ZYX")
    src = str(series.files[0]) if len(series.files) == 1 else str(series.path)
    return MedicalImage(data, tuple(float(s) for s in spacing), affine, mod, axes, src, meta)


def open_dicom(path: str | Path, series_uid: str | None = None,
               modality: str | None = None) -> MedicalImage:
    """Open a DICOM series from a file (the series it belongs to, among the files of its own
    folder), a folder or a tree holding one image series (or pick one with ``series_uid``).

    Raises:
        ImageReadError: no image series, several (use ``segmote ingest``, one case per
            series), or a bad series (see :func:`read_series`).
    """
    path = Path(path)
    if path.is_file():
        series = scan_dicom([path])
        if series[0].status != "image":
            raise ImageReadError(path, series[0].reason)
        series_uid = series_uid or series[0].series_uid
        files = [p for p in sorted(path.parent.iterdir()) if is_dicom_file(p)]  # siblings only
    else:
        files = find_dicom_files(path)
    if not files:
        raise ImageReadError(path, "no DICOM files found")
    scanned = scan_dicom(files)
    images = [s for s in scanned if s.status == "image"
              and (series_uid is None or s.series_uid == series_uid)]
    if not images:
        why = "; ".join(f"{s.where.name}: {s.reason}" for s in scanned if s.reason)[:600]
        raise ImageReadError(path, f"no readable DICOM image series ({why or 'none found'})")
    if len(images) > 1:
        raise ImageReadError(path, f"{len(images)} DICOM image series here; open one series "
                                   "folder, pass series_uid=, or use `segmote ingest` (one case "
                                   "per series)")
    return read_series(images[0], modality=modality)
