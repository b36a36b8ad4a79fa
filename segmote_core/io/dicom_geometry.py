"""Frames, slice order, affine and pixel type of one DICOM series (headers only).

World coordinates: DICOM patient coordinates are LPS; the project's affines (like the NIfTI
reader's) are RAS+, so x and y are negated. The ``(z, y, x)`` affine's columns are the slice
step (the mean step between the first and last sorted slice; a gantry tilt stays as a shear),
the column direction times the row spacing (``PixelSpacing[0]``) and the row direction times the
column spacing (``PixelSpacing[1]``); its translation is the first slice's position.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .image import ImageReadError

__all__ = ["Frame", "SeriesGeometry", "frames_of", "series_geometry", "dicom_window",
           "LPS_TO_RAS"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_IOP_TOL = 1e-3        # direction cosines written with ~6 decimals
_REL_GAP_TOL = 0.05    # a step 5 % off the median is a missing or extra slice


@dataclass
class Frame:
    """One 2D image: a single-frame file (``index=None``) or a frame of a multi-frame file."""

    path: Path
    index: int | None
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    sop_uid: str
    window: tuple[float, float] | None


def _floats(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in (value if hasattr(value, "__len__") and not isinstance(
            value, str) else [value])]
    except (TypeError, ValueError):
        return None


def _window(item: Any) -> tuple[float, float] | None:
    c, w = _floats(item.get("WindowCenter")), _floats(item.get("WindowWidth"))
    return (c[0], w[0]) if c and w and w[0] > 0 else None


def _group(ds: Any, i: int, name: str) -> Any:
    """The first item of functional group ``name`` for frame ``i`` (per-frame, else shared)."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per and i < len(per) and name in per[i] and per[i][name].value:
        return per[i][name].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and name in shared[0] and shared[0][name].value:
        return shared[0][name].value[0]
    return None


def frames_of(path: Path, ds: Any) -> list[Frame]:
    """The frames of one file, with their plane geometry and rescale."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    sop = str(ds.get("SOPInstanceUID", ""))
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        frames = []
        for i in range(n):
            pos, ori = _group(ds, i, "PlanePositionSequence"), _group(ds, i, "PlaneOrientationSequence")
            meas, pvt = _group(ds, i, "PixelMeasuresSequence"), _group(ds, i, "PixelValueTransformationSequence")
            voi = _group(ds, i, "FrameVOILUTSequence")
            ipp = _floats(pos.get("ImagePositionPatient")) if pos else None
            iop = _floats(ori.get("ImageOrientationPatient")) if ori else None
            ps = _floats(meas.get("PixelSpacing")) if meas else None
            th = _floats(meas.get("SliceThickness")) if meas else None
            slope = _floats(pvt.get("RescaleSlope")) if pvt else None
            inter = _floats(pvt.get("RescaleIntercept")) if pvt else None
            frames.append(Frame(path, i, np.array(ipp) if ipp else None,
                                np.array(iop) if iop else None, tuple(ps) if ps else None,
                                th[0] if th else None, slope[0] if slope else 1.0,
                                inter[0] if inter else 0.0, sop, _window(voi) if voi else None))
        return frames
    ipp, iop = _floats(ds.get("ImagePositionPatient")), _floats(ds.get("ImageOrientationPatient"))
    ps = _floats(ds.get("PixelSpacing")) or _floats(ds.get("ImagerPixelSpacing"))
    th = _floats(ds.get("SliceThickness"))
    slope, inter = _floats(ds.get("RescaleSlope")), _floats(ds.get("RescaleIntercept"))
    common = dict(pixel_spacing=tuple(ps[:2]) if ps else None, thickness=th[0] if th else None,
                  slope=slope[0] if slope else 1.0, intercept=inter[0] if inter else 0.0,
                  sop_uid=sop, window=_window(ds))
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    if n > 1 and offsets and ipp and iop and len(offsets) == n:  # e.g. legacy NM / dose grids
        normal = np.cross(iop[:3], iop[3:])
        return [Frame(path, i, np.array(ipp) + o * normal, np.array(iop), **common)
                for i, o in enumerate(offsets)]
    if n > 1:
        raise ImageReadError(path, f"{n} frames without plane positions (a cine or time "
                                   "series): SegMoTE reads 2D images and 3D volumes")
    return [Frame(path, None, np.array(ipp) if ipp else None, np.array(iop) if iop else None,
                  **common)]


def _check_pixels(path: Path, ds: Any) -> None:
    """A compressed syntax needs a decoder; uncompressed pixel data must be complete."""
    from pydicom.uid import UID, ImplicitVRLittleEndian

    ts = UID(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ImplicitVRLittleEndian))
    if ts.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            dec = get_decoder(ts)
        except NotImplementedError:
            raise ImageReadError(path, f"pixel data compressed as {ts.name} ({ts}); no Python "
                                       "decoder exists for it: convert the series to an "
                                       "uncompressed syntax first") from None
        if not dec.is_available:
            raise ImageReadError(path, f"pixel data compressed as {ts.name} ({ts}) and no "
                                       "decoder for it is installed: pip install "
                                       "'segmote[dicom]' (pylibjpeg with its libjpeg/openjpeg "
                                       "plugins)")
        return
    n = int(ds.get("NumberOfFrames", 1) or 1)
    need = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * n *
            int(ds.get("BitsAllocated", 16))) // 8
    have = path.stat().st_size - int(getattr(ds, "_segmote_pixel_offset", 0))
    if have < need:
        raise ImageReadError(path, f"truncated: {max(have, 0)} bytes after the header, the "
                                   f"pixel data needs {need}")


@dataclass
class SeriesGeometry:
    frames: list[Frame]             # in slice order
    rows: int
    cols: int
    rgb: bool
    monochrome1: bool
    stored_range: tuple[int, int]
    dtype: np.dtype
    spacing: tuple[float, float, float]     # (z, y, x) mm
    affine: np.ndarray                       # (z, y, x) -> RAS+
    positioned: bool                         # world coordinates known (IOP + IPP)
    spacing_known: bool
    transfer_syntax_name: str
    photometric: str
    modality_code: str
    sop_class_name: str

    def summary(self, n_files: int, notes: list[str]) -> dict[str, Any]:
        """Non-identifying facts about the series (what the cohort keeps)."""
        rescale = sorted({(f.slope, f.intercept) for f in self.frames})
        return {"modality": self.modality_code, "sop_class": self.sop_class_name,
                "transfer_syntax": self.transfer_syntax_name, "photometric": self.photometric,
                "n_files": n_files, "n_slices": len(self.frames),
                "rescale": [list(r) for r in rescale[:4]], "notes": list(notes)}

    def uids(self, first: Any) -> dict[str, Any]:
        """The UIDs a DICOM-SEG needs to reference the source, in slice order."""
        return {"study": str(first.get("StudyInstanceUID", "")),
                "series": str(first.get("SeriesInstanceUID", "")),
                "frame_of_reference": str(first.get("FrameOfReferenceUID", "")),
                "sop_class": str(first.get("SOPClassUID", "")),
                "sop_instances": [f.sop_uid for f in self.frames],
                "frames": [None if f.index is None else f.index + 1 for f in self.frames]}


def _mixed(what: str, values: list[Any], frames: list[Frame], where: Path) -> ImageReadError:
    counts = Counter(values)
    examples = {v: next(f.path.name for f, x in zip(frames, values) if x == v) for v in counts}
    desc = ", ".join(f"{v} x{c} (e.g. {examples[v]})" for v, c in counts.most_common(4))
    return ImageReadError(where, f"mixed {what} in one series: {desc}")


def series_geometry(files: list[Path], headers: list[Any], where: Path) -> SeriesGeometry:
    """Check a series' files and compute its slice order and geometry (see module docstring)."""
    from pydicom.uid import UID, ImplicitVRLittleEndian

    frames: list[Frame] = []
    for path, ds in zip(files, headers):
        _check_pixels(path, ds)
        frames.extend(frames_of(path, ds))
    first = headers[0]
    sizes = [(int(ds.Rows), int(ds.Columns)) for ds in headers]
    if len(set(sizes)) > 1:
        raise _mixed("image sizes (rows, columns)", sizes, [frames_of(p, d)[0] for p, d in
                                                             zip(files, headers)], where)
    for key in ("SamplesPerPixel", "BitsAllocated", "PixelRepresentation"):
        vals = [int(ds.get(key, 0) or 0) for ds in headers]
        if len(set(vals)) > 1:
            raise ImageReadError(where, f"mixed {key} in one series: {sorted(set(vals))}")
    rows, cols = sizes[0]
    iops = [None if f.iop is None else tuple(np.round(f.iop, 3)) for f in frames]
    if len(frames) > 1 and any(i is None for i in iops):
        raise ImageReadError(where, "slices without ImageOrientationPatient: their order and "
                                    "spacing are unknown")
    if len(frames) > 1 and any(np.abs(f.iop - frames[0].iop).max() > _IOP_TOL for f in frames):
        raise _mixed("orientations (ImageOrientationPatient)", iops, frames, where)
    pss = [f.pixel_spacing for f in frames]
    if len({None if p is None else tuple(np.round(p, 4)) for p in pss}) > 1:
        raise _mixed("pixel spacings", pss, frames, where)
    ps = pss[0] or (1.0, 1.0)
    positioned = frames[0].iop is not None and all(f.ipp is not None for f in frames)
    if len(frames) > 1 and not positioned:
        raise ImageReadError(where, "slices without ImagePositionPatient: their order and "
                                    "spacing are unknown")
    if positioned:
        row, col = frames[0].iop[:3], frames[0].iop[3:]
        normal = np.cross(row, col)
        dist = np.array([float(f.ipp @ normal) for f in frames])
        order = np.argsort(dist, kind="stable")
        frames, dist = [frames[i] for i in order], dist[order]
        step_vec = _slice_step(frames, dist, where, normal, frames[0].thickness)
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1], lps[:3, 2] = step_vec, col * ps[0], row * ps[1]
        lps[:3, 3] = frames[0].ipp
        affine = LPS_TO_RAS @ lps
        spacing = (float(np.linalg.norm(step_vec)), float(ps[0]), float(ps[1]))
    else:
        spacing = (1.0, float(ps[0]), float(ps[1]))
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
    spp = int(first.get("SamplesPerPixel", 1) or 1)
    photometric = str(first.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp == 3 and photometric.startswith("PALETTE"):
        raise ImageReadError(where, "palette-colour images are not supported")
    bits = int(first.get("BitsStored", first.get("BitsAllocated", 16)) or 16)
    signed = int(first.get("PixelRepresentation", 0) or 0) == 1
    stored = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    ts = UID(getattr(first, "file_meta", {}).get("TransferSyntaxUID", ImplicitVRLittleEndian))
    return SeriesGeometry(
        frames, rows, cols, spp == 3, photometric == "MONOCHROME1", stored,
        _output_dtype(frames, stored, int(first.get("BitsAllocated", 16) or 16), spp == 3),
        spacing, affine, positioned, pss[0] is not None, ts.name, photometric,
        str(first.get("Modality", "")), UID(str(first.get("SOPClassUID", ""))).name)


def _slice_step(frames: list[Frame], dist: np.ndarray, where: Path, normal: np.ndarray,
                thickness: float | None) -> np.ndarray:
    """The mean step vector between sorted slices; duplicate or uneven positions are errors."""
    if len(frames) == 1:
        return normal * float(thickness or 1.0)
    steps = np.diff(dist)
    med = float(np.median(steps))
    if steps.min() < max(1e-3, 0.01 * abs(med)):
        i = int(np.argmin(steps))
        raise ImageReadError(where, f"{int((steps < max(1e-3, 0.01 * abs(med))).sum()) + 1} "
                                    f"slices share a position (e.g. {_name(frames[i])} and "
                                    f"{_name(frames[i + 1])} at {dist[i]:.3f} mm): several "
                                    "acquisitions, echoes or time points in one series")
    bad = np.flatnonzero(np.abs(steps - med) > _REL_GAP_TOL * med + 1e-3)
    if bad.size:
        i = int(bad[0])
        kind = "a missing slice?" if steps[i] > med else "an extra slice?"
        raise ImageReadError(where, f"uneven slice spacing: {steps[i]:.3f} mm between slices "
                                    f"{i} ({_name(frames[i])}) and {i + 1} "
                                    f"({_name(frames[i + 1])}), {med:.3f} mm elsewhere ({kind}; "
                                    f"{bad.size} uneven step(s) of {steps.size})")
    return (frames[-1].ipp - frames[0].ipp) / (len(frames) - 1)


def _name(fr: Frame) -> str:
    return fr.path.name if fr.index is None else f"{fr.path.name} frame {fr.index + 1}"


def _output_dtype(frames: list[Frame], stored: tuple[int, int], bits_alloc: int,
                  rgb: bool) -> np.dtype:
    """The smallest exact dtype of the rescaled values (float32 for non-integer rescales)."""
    slopes = {f.slope for f in frames}
    inters = [f.intercept for f in frames]
    if rgb:
        return np.dtype(np.uint8 if bits_alloc <= 8 else np.uint16)
    if slopes != {1.0} or any(i != round(i) for i in inters):
        return np.dtype(np.float32)
    lo, hi = stored[0] + min(inters), stored[1] + max(inters)
    for dt in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max and (dt is not np.uint8 or bits_alloc <= 8):
            return np.dtype(dt)
    return np.dtype(np.float64)


def dicom_window(first: Any, geom: SeriesGeometry) -> list[float] | None:
    """The default display window ``[centre, width]`` (rescaled units, e.g. HU), if any."""
    w = geom.frames[0].window or _window(first)
    return [float(w[0]), float(w[1])] if w else None
