"""DICOM test series written with pydicom from arrays, with their known geometry.

Every series carries patient identifiers (name, id, birth date, dates, institution, accession)
so the tests can check none of them reaches a cohort or a log.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                         SecondaryCaptureImageStorage, generate_uid)

#: identifying values planted in every test file (none may leave the DICOM files)
PATIENT = {"PatientName": "DOE^JANE^Q", "PatientID": "PID-SECRET-4711",
           "PatientBirthDate": "19610302", "PatientSex": "F", "StudyDate": "20240117",
           "SeriesDate": "20240117", "StudyTime": "101500", "AccessionNumber": "ACC-998877",
           "InstitutionName": "St Elsewhere Hospital", "ReferringPhysicianName": "HOUSE^G",
           "StudyID": "STUDY-1234", "OperatorsName": "TECH^ANNA"}
SECRETS = ("DOE", "JANE", "PID-SECRET-4711", "19610302", "20240117", "ACC-998877",
           "Elsewhere", "HOUSE", "STUDY-1234", "TECH^ANNA")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Series:
    """A written series: its folder, files in slice order, the values and the true geometry."""

    folder: Path
    files: list[Path]                     # in slice order (z ascending)
    values: np.ndarray                    # (Z, Y, X) physical values (HU for CT)
    affine: np.ndarray                    # expected (z, y, x) -> RAS+ affine
    study_uid: str
    series_uid: str
    sop_uids: list[str] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)


def oblique_iop(angle_deg: float = 20.0, tilt_deg: float = 10.0) -> np.ndarray:
    """Row and column cosines of an axial plane rotated about z then about the row axis."""
    a, t = np.deg2rad(angle_deg), np.deg2rad(tilt_deg)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a), np.cos(a), 0.0])
    col = np.cos(t) * col + np.sin(t) * np.cross(row, col)
    return np.concatenate([row, col / np.linalg.norm(col)])


def make_dataset(stored: np.ndarray, *, modality: str, sop_class: str, study_uid: str,
                 series_uid: str, for_uid: str, number: int, ipp=None, iop=None,
                 pixel_spacing=None, thickness=None, slope: float = 1.0,
                 intercept: float = 0.0, window=None, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 photometric: str = "MONOCHROME2") -> Dataset:
    """One single-frame image dataset (uncompressed, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for k, v in PATIENT.items():
        setattr(ds, k, v)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = modality, study_uid, series_uid
    ds.FrameOfReferenceUID, ds.SeriesNumber, ds.InstanceNumber = for_uid, 3, number
    ds.SeriesDescription = "DOE JANE chest"    # free text may name the patient: never copied
    ds.Manufacturer, ds.PositionReferenceIndicator = "ACME", ""
    ds.ImageType = list(image_type)
    if ipp is not None:
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in iop]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = float(thickness)
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 3 if stored.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if stored.ndim == 3 else photometric
    if stored.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = stored.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    if slope != 1.0 or intercept != 0.0 or modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.RescaleType = "HU" if modality == "CT" else "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def write_series(folder: Path, values: np.ndarray, *, modality: str = "CT",
                 spacing=(2.5, 0.8, 0.7), iop=(1, 0, 0, 0, 1, 0), origin=(-30.0, -40.0, 100.0),
                 slope: float = 1.0, intercept: float = -1024.0, stored_dtype=np.uint16,
                 window=(40.0, 400.0), shuffle_seed: int | None = 0, drop: tuple[int, ...] = (),
                 name: str = "uid", transfer_syntax: str | None = None,
                 study_uid: str | None = None) -> Series:
    """Write ``values`` (Z, Y, X) as one series: stored = (values - intercept) / slope.

    Slice ``z`` sits at ``origin + z * spacing[0] * normal`` (LPS); files are named by their
    SOP instance UID (``name="uid"``) in a shuffled order, or ``IM<n>`` with n shuffled.
    ``drop`` omits slices (a gap). Returns the files in slice order and the true RAS affine.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    study_uid = study_uid or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid()
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality,
                                                                 SecondaryCaptureImageStorage)
    stored = np.round((values.astype(np.float64) - intercept) / slope).astype(stored_dtype)
    assert np.allclose(stored * slope + intercept, values), "values not representable"
    nz = values.shape[0]
    numbers = np.random.default_rng(shuffle_seed).permutation(nz) if shuffle_seed is not None \
        else np.arange(nz)
    out = Series(folder, [], values, np.eye(4), study_uid, series_uid)
    for z in range(nz):
        ipp = np.asarray(origin) + z * spacing[0] * normal
        ds = make_dataset(stored[z], modality=modality, sop_class=sop_class, study_uid=study_uid,
                          series_uid=series_uid, for_uid=for_uid, number=int(numbers[z]) + 1,
                          ipp=ipp, iop=iop, pixel_spacing=spacing[1:], thickness=spacing[0],
                          slope=slope, intercept=intercept, window=window)
        if transfer_syntax is not None:
            ds.compress(transfer_syntax, np.ascontiguousarray(stored[z]))
        path = folder / (f"{ds.SOPInstanceUID}.dcm" if name == "uid" else
                         f"IM{int(numbers[z]):04d}")
        if z in drop:
            continue
        ds.save_as(path, enforce_file_format=True)
        out.files.append(path)
        out.sop_uids.append(str(ds.SOPInstanceUID))
        out.datasets.append(ds)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = spacing[0] * normal, spacing[1] * col, spacing[2] * row
    lps[:3, 3] = origin
    out.affine = LPS_TO_RAS @ lps
    return out


def write_scout(folder: Path, study_uid: str, size=(32, 40)) -> Path:
    """A CT localizer (ImageType LOCALIZER) in its own series, sagittal."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = make_dataset(np.full(size, 1000, np.uint16), modality="CT", sop_class=CTImageStorage,
                      study_uid=study_uid, series_uid=generate_uid(), for_uid=generate_uid(),
                      number=1, ipp=(0, -100, 200), iop=(0, 1, 0, 0, 0, -1),
                      pixel_spacing=(2.0, 2.0), intercept=-1024,
                      image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    path = folder / "scout.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_phantom(slices: int = 10, size: int = 48, seed: int = 3):
    """The demo CT phantom (HU, labels, spacing) at test size."""
    from training.phantoms_ct import ct_volume

    return ct_volume(np.random.default_rng(seed), slices=slices, size=size)


def mr_values() -> np.ndarray:
    return _mr_values().copy()


@functools.lru_cache(maxsize=1)
def _mr_values() -> np.ndarray:
    """The demo MR phantom (the MNI T1 template the demo brain is made of, every 6th voxel,
    9 axial slices) scaled to 0..1000 in exact multiples of the rescale slope 0.25; a smooth
    synthetic volume when nilearn's template is not installed."""
    try:
        from training.phantoms_brain import load_mni_template

        t1 = np.asarray(load_mni_template().t1, np.float64)       # (X, Y, Z)
        vol = t1[::6, ::6, 50:140:10].transpose(2, 1, 0)
    except (FileNotFoundError, ImportError):
        zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in (9, 36, 44)), indexing="ij")
        vol = np.exp(-(zz ** 2 + yy ** 2 + xx ** 2) * 2)
    vol = (vol - vol.min()) / max(float(np.ptp(vol)), 1e-6) * 1000
    return np.round(vol * 4) / 4
