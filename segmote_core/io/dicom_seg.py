"""DICOM-SEG out (highdicom): a label volume back onto its source DICOM series.

```python
from segmote_core.io.dicom_seg import write_dicom_seg
write_dicom_seg(labels, "case.seg.dcm", source="dicom/ct_series/",
                categories={1: "liver", 2: "kidney"})
# or from a cohort case ingested with --keep-uids (no DICOM files needed):
write_dicom_seg(labels, "case.seg.dcm", source=case.attrs["dicom_uids"], like=case.as_image())
```
One SEG per case (BINARY, one segment per label id, labelled from the categories), every frame
referencing the source slice's SOP instance, plane position and frame of reference, so OHIF,
3D Slicer and PACS viewers show it over the source. ``labels[z]`` is slice ``z`` in the reader's
order (sorted along the slice normal), the order of :func:`segmote_core.io.open_image`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..fileio import atomic_write
from .dicom_geometry import LPS_TO_RAS
from .image import ImageReadError, MedicalImage

__all__ = ["write_dicom_seg", "source_datasets"]

log = logging.getLogger(__name__)

# Type-2 patient/study attributes: the SEG copies them from the source; a UID-only source has
# none (the cohort keeps no patient data), so they are written empty
_EMPTY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def source_datasets(source: Any, series_uid: str | None = None,
                    like: MedicalImage | None = None) -> tuple[list[Any], list[int]]:
    """The source images a SEG refers to, and for each label slice ``z`` the index of its frame
    in the SEG's pixel array.

    Args:
        source: a DICOM folder / file (the series is read from it), or the ``dicom_uids`` dict
            that ``segmote ingest --keep-uids`` stores (then ``like`` gives the geometry).
        series_uid: pick this series when the folder holds several.
    """
    if isinstance(source, Mapping):
        if like is None:
            raise ValueError("a UID-only source needs like= (the case's image: shape, affine)")
        return _datasets_from_uids(dict(source), like)
    import pydicom

    from .dicom import find_dicom_files, scan_dicom
    from .dicom_geometry import series_geometry

    path = Path(source)
    images = [s for s in scan_dicom(find_dicom_files(path)) if s.status == "image"
              and (series_uid is None or s.series_uid == series_uid)]
    if len(images) != 1:
        raise ImageReadError(path, f"{len(images)} DICOM image series found"
                                   f"{' with SeriesInstanceUID ' + series_uid if series_uid else ''}"
                                   "; the SEG needs exactly one source series (pass series_uid)")
    series = images[0]
    geom = series_geometry(series.files, series.headers, series.path)
    files = list(dict.fromkeys(f.path for f in geom.frames))
    if len(files) == 1 and geom.frames[0].index is not None:  # one enhanced multi-frame file
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        return [ds], [f.index for f in geom.frames]
    order = {p: i for i, p in enumerate(files)}
    return ([pydicom.dcmread(p, stop_before_pixels=True) for p in files],
            [order[f.path] for f in geom.frames])


def _datasets_from_uids(uids: dict[str, Any], like: MedicalImage) -> tuple[list[Any], list[int]]:
    """Stand-in source datasets: the kept UIDs plus the plane geometry of ``like``."""
    from pydicom.dataset import Dataset

    sops = list(uids.get("sop_instances") or [])
    shape = like.shape if like.is_volume else (1, *like.shape[:2])
    if len(sops) != shape[0]:
        raise ValueError(f"{like.source}: {len(sops)} kept SOP instance UIDs for "
                         f"{shape[0]} slices")
    if any(uids.get("frames") or []):
        raise ValueError(f"{like.source}: the source is a multi-frame file; give its folder as "
                         "source (a UID-only SEG is written for single-frame series)")
    lps = LPS_TO_RAS @ np.asarray(like.affine, float)
    col_sp, row_sp = np.linalg.norm(lps[:3, 1]), np.linalg.norm(lps[:3, 2])
    iop = np.concatenate([lps[:3, 2] / row_sp, lps[:3, 1] / col_sp])
    out = []
    for z, sop in enumerate(sops):
        ds = Dataset()
        for key in _EMPTY_TYPE2:
            setattr(ds, key, "")
        ds.SOPClassUID, ds.SOPInstanceUID = uids["sop_class"], sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["frame_of_reference"]
        ds.Modality = str((like.meta.get("dicom") or {}).get("modality") or "OT")
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in iop]
        ds.ImagePositionPatient = [round(float(v), 6) for v in (lps @ [z, 0, 0, 1])[:3]]
        ds.PixelSpacing = [float(col_sp), float(row_sp)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 0]))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        out.append(ds)
    return out, list(range(len(sops)))


def _segment_description(number: int, label_id: int, name: str, manual: bool) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    key = "".join(w.capitalize() for w in name.replace("_", " ").split())
    ptype = getattr(codes.SCT, key, None) if key else None
    lesion = any(w in name.lower() for w in ("tumor", "tumour", "lesion", "nodule", "cancer"))
    if ptype is None:
        ptype = codes.SCT.Neoplasm if lesion and hasattr(codes.SCT, "Neoplasm") else \
            codes.SCT.Tissue
    category = (codes.SCT.MorphologicallyAbnormalStructure if lesion else
                codes.SCT.AnatomicalStructure if ptype is not codes.SCT.Tissue else
                codes.SCT.Tissue)
    algo = None if manual else hd.AlgorithmIdentificationSequence(
        name="SegMoTE", version=_version(), family=codes.cid7162.ArtificialIntelligence)
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64], segmented_property_category=category,
        segmented_property_type=ptype,
        algorithm_type="MANUAL" if manual else "SEMIAUTOMATIC",
        algorithm_identification=algo, tracking_id=f"label {label_id}",
        tracking_uid=hd.UID())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segmote")
    except PackageNotFoundError:
        return "0"


def write_dicom_seg(labels: Any, out_path: str | Path, source: Any, *,
                    categories: Mapping[Any, str] | None = None, series_uid: str | None = None,
                    like: MedicalImage | None = None, manual: bool = False,
                    series_description: str = "SegMoTE segmentation",
                    series_number: int = 9001) -> Path:
    """Write ``labels`` as one DICOM-SEG referencing its source series (module docstring).

    Args:
        labels: ``(Z, Y, X)`` (or ``(Y, X)`` for a one-slice source) integer ids, in the
            reader's slice order.
        out_path: the ``.dcm`` to write (atomically; never over a source file).
        source: the source series' folder or file, or the kept ``dicom_uids`` dict.
        categories: label id -> name (segment labels); other ids are named ``label <id>``.
        series_uid: the source SeriesInstanceUID when the folder holds several series
            (default: ``source["series"]`` of a UID dict).
        like: the case's image (needed for a UID-only source).
        manual: segments drawn by hand (``MANUAL``) rather than model-assisted.
    Returns:
        ``out_path``.
    Raises:
        ImageReadError / ValueError: naming the source and the problem (shape, no labels).
    """
    import highdicom as hd

    out_path = Path(out_path)
    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.dtype.kind not in "biu":
        raise ValueError(f"{out_path}: labels must be (Z, Y, X) integers, got {arr.shape} "
                         f"{arr.dtype}")
    datasets, frame_of = source_datasets(source, series_uid, like)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if arr.shape != (len(frame_of), rows, cols):
        raise ValueError(f"{source if not isinstance(source, Mapping) else 'kept UIDs'}: labels "
                         f"of shape {arr.shape} do not fit the source series "
                         f"({len(frame_of)} slices of {rows}x{cols})")
    sources = {str(getattr(ds, "filename", "") or "") for ds in datasets}
    if str(out_path.resolve()) in {str(Path(s).resolve()) for s in sources if s}:
        raise ValueError(f"{out_path}: refusing to overwrite a source DICOM file")
    names = {int(k): str(v) for k, v in (categories or {}).items()}
    ids = sorted(set(np.unique(arr).tolist()) - {0} | (set(names) if not arr.any() else set()))
    if not ids:
        raise ValueError(f"{out_path}: the labels are empty and no categories are given: "
                         "a DICOM-SEG needs at least one segment")
    lut = np.zeros(int(max(ids)) + 1, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1)
    seg_pixels = np.zeros((len(frame_of), rows, cols), np.uint16)
    seg_pixels[frame_of] = lut[np.clip(arr, 0, len(lut) - 1)] * (arr < len(lut))
    descriptions = [_segment_description(i + 1, lid, names.get(lid, f"label {lid}"), manual)
                    for i, lid in enumerate(ids)]
    try:
        seg = _segmentation(hd, datasets, seg_pixels, frame_of, descriptions, series_number,
                            series_description, omit_empty=bool(arr.any()))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom quotes the offending value, which may be a patient attribute: redact it
        why = re.sub(r"'[^']*'|\"[^\"]*\"", "'<redacted>'", str(exc))
        raise ValueError(f"{out_path}: the source series cannot be referenced by a SEG "
                         f"({type(exc).__name__}: {why})") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))
    log.info("wrote DICOM-SEG %s: %d segment(s) over %d source slice(s)", out_path, len(ids),
             len(frame_of))
    return out_path


def _segmentation(hd: Any, datasets: list[Any], seg_pixels: np.ndarray, frame_of: list[int],
                  descriptions: list[Any], series_number: int, series_description: str,
                  omit_empty: bool) -> Any:
    import warnings

    from pydicom import config

    # pydicom's value checks warn (and log) with the invalid value itself, e.g. a malformed
    # birth date: keep them out of the logs; an unusable value still raises, redacted above
    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _build(hd, datasets, seg_pixels, frame_of, descriptions, series_number,
                          series_description, omit_empty)
    finally:
        config.settings.reading_validation_mode = mode


def _build(hd: Any, datasets: list[Any], seg_pixels: np.ndarray, frame_of: list[int],
           descriptions: list[Any], series_number: int, series_description: str,
           omit_empty: bool) -> Any:
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=seg_pixels if len(datasets) > 1 or
        len(frame_of) > 1 else seg_pixels[0], segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="SegMoTE", manufacturer_model_name="SegMoTE", software_versions=_version(),
        device_serial_number="0", series_description=series_description,
        omit_empty_frames=omit_empty)
