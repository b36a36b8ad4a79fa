"""DICOM in: slice order, geometry against NIfTI and SimpleITK, rescale, compressed and
multi-frame files, and named errors for bad series."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # the dicom extra

from segmote_core.io import ImageReadError, open_image
from segmote_core.io.dicom import dicom_modality
from tests.io.dicom_series import (LPS_TO_RAS, ct_phantom, make_dataset, mr_values, oblique_iop,
                                   write_series)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ORIENTATIONS = {"axial": (1, 0, 0, 0, 1, 0), "oblique": tuple(oblique_iop()),
                "sagittal": (0, 1, 0, 0, 0, -1)}


def corners(shape):
    z, y, x = (s - 1 for s in shape)
    return np.array([[a, b, c, 1] for a in (0, z) for b in (0, y) for c in (0, x)], float)


def dcm2niix_style_nifti(path: Path, values: np.ndarray, affine_zyx: np.ndarray) -> Path:
    """The NIfTI a dcm2niix-style conversion makes: rows flipped (y reversed) so the file is
    stored bottom-up, the affine compensating, i.e. the same world position for every voxel."""
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, values.shape[1] - 1      # y' = Y-1-y
    aff = affine_zyx @ flip
    data = values[:, ::-1, :].transpose(2, 1, 0)           # (Z, Y', X) -> (X, Y', Z)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), aff[:, [2, 1, 0, 3]]), str(path))
    return path


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom(slices=10, size=48)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_ct_series_matches_nifti_voxels_and_world(tmp_path, phantom, orientation):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "ct", hu, spacing=spacing, iop=ORIENTATIONS[orientation],
                     name="IM", slope=1.0, intercept=-1024.0)
    # the file names (IM<InstanceNumber>) are shuffled against the slice positions
    names = [p.name for p in s.files]
    assert names != sorted(names)
    img = open_image(tmp_path / "ct")
    assert img.axes == "ZYX" and img.modality == "CT" and img.shape == hu.shape
    assert img.data.dtype.kind == "i"                        # HU, exact integers
    np.testing.assert_array_equal(np.asarray(img.data), hu)
    np.testing.assert_allclose(img.affine, s.affine, atol=1e-6)
    np.testing.assert_allclose(img.spacing, spacing, rtol=1e-6)
    assert img.meta["window"] == [40.0, 400.0]
    assert img.data.chunks[0] == (1,) * hu.shape[0]          # lazy, one slice per chunk

    nii = open_image(dcm2niix_style_nifti(tmp_path / "ct.nii.gz", hu, s.affine))
    flipped = np.asarray(nii.data)[:, ::-1, :]
    np.testing.assert_array_equal(flipped, np.asarray(img.data))
    for c in corners(hu.shape):
        z, y, x = c[:3].astype(int)
        nii_vox = np.array([z, hu.shape[1] - 1 - y, x, 1.0])
        np.testing.assert_allclose(img.affine @ c, nii.affine @ nii_vox, atol=1e-5)
        assert np.asarray(img.data[z, y, x]) == np.asarray(nii.data[z, hu.shape[1] - 1 - y, x])


def test_world_coordinates_agree_with_simpleitk(tmp_path, phantom):
    sitk = pytest.importorskip("SimpleITK")
    hu, _, spacing = phantom
    write_series(tmp_path / "ct", hu, spacing=spacing, iop=oblique_iop(30, 15))
    img = open_image(tmp_path / "ct")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    ref = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), np.asarray(img.data))
    for c in corners(hu.shape):
        lps = np.array(ref.TransformIndexToPhysicalPoint([int(c[2]), int(c[1]), int(c[0])]))
        np.testing.assert_allclose((LPS_TO_RAS[:3, :3] @ lps), (img.affine @ c)[:3], atol=1e-4)


def test_mr_rescale_slope_gives_float_values(tmp_path):
    values = mr_values()
    write_series(tmp_path / "mr", values, modality="MR", slope=0.25, intercept=0.0, window=None)
    img = open_image(tmp_path / "mr")
    assert img.modality == "MR" and img.data.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(img.data), values.astype(np.float32))
    assert img.meta["window"] is None
    assert img.meta["dicom"]["rescale"] == [[0.25, 0.0]]


def test_one_file_opens_its_whole_series(tmp_path, phantom):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "ct", hu, spacing=spacing)
    img = open_image(s.files[3])
    assert img.shape == hu.shape
    np.testing.assert_array_equal(np.asarray(img.data), hu)


def test_modality_names():
    assert [dicom_modality(m) for m in ("CT", "MR", "CR", "DX", "MG", "PT", "XC", "US")] == \
        ["CT", "MR", "XR", "XR", "XR", "PET", "DERM", "US"]


def test_bundled_single_slice_ct_in_hu(tmp_path):
    shutil.copy(TEST_FILES / "CT_small.dcm", tmp_path / "CT_small.dcm")
    ds = pydicom.dcmread(tmp_path / "CT_small.dcm")
    img = open_image(tmp_path / "CT_small.dcm")
    assert img.axes == "YX" and img.modality == "CT"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(img.data, hu)
    assert img.spacing == tuple(float(v) for v in ds.PixelSpacing)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_bundled_compressed_files_decode_like_uncompressed(tmp_path, name):
    # each in its own folder: pydicom's MR_small* files share one SeriesInstanceUID
    for sub, f in (("ref", "MR_small.dcm"), ("c", name)):
        (tmp_path / sub).mkdir()
        shutil.copy(TEST_FILES / f, tmp_path / sub / f)
    ref = open_image(tmp_path / "ref" / "MR_small.dcm")
    img = open_image(tmp_path / "c" / name)
    np.testing.assert_array_equal(img.data, ref.data)
    assert img.meta["dicom"]["transfer_syntax"] != ref.meta["dicom"]["transfer_syntax"]


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless])
def test_compressed_series_equals_uncompressed(tmp_path, phantom, syntax):
    from pydicom.pixels import get_encoder

    if not get_encoder(syntax).is_available:
        pytest.skip(f"no encoder for {syntax.name} installed (pip install 'segmote[dicom]')")
    hu, _, spacing = phantom
    write_series(tmp_path / "c", hu, spacing=spacing, transfer_syntax=syntax)
    img = open_image(tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(img.data), hu)
    assert img.meta["dicom"]["transfer_syntax"] == syntax.name


def test_syntax_without_decoder_is_a_named_error(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "MR_small_RLE.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML      # no Python decoder exists
    path = tmp_path / "video.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError) as err:
        open_image(path)
    assert str(path) in str(err.value) and "MPEG2" in str(err.value)


def test_enhanced_multiframe_reads_like_the_classic_series(tmp_path, phantom):
    hd = pytest.importorskip("highdicom")
    hu, _, spacing = phantom
    s = write_series(tmp_path / "classic", hu, spacing=spacing, iop=oblique_iop())
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in s.files[::-1]], series_instance_uid=hd.UID(),
        series_number=4, sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm")
    img = open_image(tmp_path / "mf" / "enhanced.dcm")
    classic = open_image(tmp_path / "classic")
    assert img.meta["dicom"]["n_files"] == 1 and img.meta["dicom"]["n_slices"] == hu.shape[0]
    np.testing.assert_array_equal(np.asarray(img.data), hu)
    np.testing.assert_allclose(img.affine, classic.affine, atol=1e-5)


# ---------------------------------------------------------------------------- bad series
def test_missing_slice_names_both_files(tmp_path, phantom):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "gap", hu, spacing=spacing, drop=(4,))
    with pytest.raises(ImageReadError) as err:
        open_image(tmp_path / "gap")
    msg = str(err.value)
    assert "uneven slice spacing" in msg and "missing slice" in msg
    assert s.files[3].name in msg and s.files[4].name in msg     # the neighbours of the gap


def _rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path)


def test_mixed_orientation_in_one_series(tmp_path, phantom):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "mix", hu, spacing=spacing)
    _rewrite(s.files[5], ImageOrientationPatient=list(oblique_iop(25, 0)))
    with pytest.raises(ImageReadError, match="mixed orientations") as err:
        open_image(tmp_path / "mix")
    assert s.files[5].name in str(err.value)


def test_mixed_sizes_in_one_series(tmp_path, phantom):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "mix", hu, spacing=spacing)
    ds = pydicom.dcmread(s.files[2])
    small = make_dataset(np.zeros((20, 24), np.uint16), modality="CT",
                         sop_class=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
                         series_uid=ds.SeriesInstanceUID, for_uid=ds.FrameOfReferenceUID,
                         number=99, ipp=ds.ImagePositionPatient, iop=ds.ImageOrientationPatient,
                         pixel_spacing=ds.PixelSpacing)
    small.save_as(s.files[2], enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"mixed image sizes.*\(20, 24\)") as err:
        open_image(tmp_path / "mix")
    assert s.files[2].name in str(err.value)


def test_duplicate_positions_are_refused(tmp_path, phantom):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "dup", hu, spacing=spacing)
    _rewrite(s.files[6], ImagePositionPatient=pydicom.dcmread(s.files[5]).ImagePositionPatient)
    with pytest.raises(ImageReadError, match="share a position"):
        open_image(tmp_path / "dup")


def test_truncated_slice_is_named(tmp_path, phantom):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "t", hu, spacing=spacing)
    data = s.files[7].read_bytes()
    s.files[7].write_bytes(data[: len(data) - 500])
    with pytest.raises(ImageReadError, match="truncated") as err:
        open_image(tmp_path / "t")
    assert str(s.files[7]) in str(err.value)
    shutil.copy(TEST_FILES / "MR_truncated.dcm", tmp_path / "MR_truncated.dcm")
    with pytest.raises(ImageReadError, match="truncated"):
        open_image(tmp_path / "MR_truncated.dcm")


@pytest.mark.parametrize("name, what", [("rtstruct.dcm", "RT Structure Set"),
                                        ("test-SR.dcm", "SR"),
                                        ("dicomdirtests/DICOMDIR", "DICOMDIR")])
def test_non_image_objects_are_named_errors(tmp_path, name, what):
    path = tmp_path / Path(name).name
    shutil.copy(TEST_FILES / name, path)
    with pytest.raises(ImageReadError) as err:
        open_image(path)
    assert str(path) in str(err.value) and what in str(err.value)


def test_scout_beside_a_series_is_skipped(tmp_path, phantom):
    from tests.io.dicom_series import write_scout

    hu, _, spacing = phantom
    s = write_series(tmp_path / "study" / "ct", hu, spacing=spacing)
    write_scout(tmp_path / "study" / "scout", s.study_uid)
    img = open_image(tmp_path / "study")          # the localizer series is not a second series
    np.testing.assert_array_equal(np.asarray(img.data), hu)


def test_monochrome1_radiograph_is_inverted(tmp_path):
    from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

    stored = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) % 4096)
    ds = make_dataset(stored, modality="CR", sop_class=ComputedRadiographyImageStorage,
                      study_uid=generate_uid(), series_uid=generate_uid(),
                      for_uid=generate_uid(), number=1, pixel_spacing=(0.2, 0.2),
                      photometric="MONOCHROME1")
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
    img = open_image(tmp_path / "cr.dcm")
    assert img.axes == "YX" and img.modality == "XR" and img.spacing == (0.2, 0.2)
    np.testing.assert_array_equal(img.data, 4095 - stored)


def test_rgb_secondary_capture_is_yxc(tmp_path):
    shutil.copy(TEST_FILES / "SC_rgb_rle.dcm", tmp_path / "rgb.dcm")
    ds = pydicom.dcmread(tmp_path / "rgb.dcm")
    img = open_image(tmp_path / "rgb.dcm")
    assert img.axes == "YXC" and img.shape == (ds.Rows, ds.Columns, 3)
    np.testing.assert_array_equal(img.data, ds.pixel_array)


def test_napari_reader_opens_a_dicom_folder_like_its_nifti(tmp_path, phantom):
    pytest.importorskip("napari")
    from napari_segmote._reader import napari_get_reader

    hu, _, spacing = phantom
    s = write_series(tmp_path / "ct", hu, spacing=spacing, iop=oblique_iop())
    nifti = dcm2niix_style_nifti(tmp_path / "ct.nii.gz", hu, s.affine)
    (tmp_path / "empty_dir").mkdir()
    reader = napari_get_reader(str(tmp_path / "ct"))
    assert reader is not None and napari_get_reader(str(tmp_path / "empty_dir")) is None
    assert reader(str(tmp_path / "ct"))[0][1]["scale"] is not None
    # through the plugin's npe2 manifest, as napari's File > Open Folder does
    npe2 = pytest.importorskip("npe2")
    npe2.PluginManager.instance().discover()
    [(data, kwargs, kind)] = npe2.read([str(tmp_path / "ct")], stack=False,
                                       plugin_name="segmote")
    [(ndata, nkwargs, _)] = napari_get_reader(str(nifti))(str(nifti))
    assert kind == "image"
    np.testing.assert_array_equal(np.asarray(data), hu)
    np.testing.assert_allclose(kwargs["scale"], nkwargs["scale"])     # same voxel size
    np.testing.assert_allclose(kwargs["scale"], spacing)
    aff = np.asarray(kwargs["metadata"]["segmote"]["affine"])
    naff = np.asarray(nkwargs["metadata"]["segmote"]["affine"])
    for c in corners(hu.shape):                                       # same world corners
        flipped = c.copy()
        flipped[1] = hu.shape[1] - 1 - c[1]
        np.testing.assert_allclose(aff @ c, naff @ flipped, atol=1e-5)
    assert kwargs["contrast_limits"] == (-160.0, 240.0)               # the series' 40/400 window


def test_read_limits_apply_to_dicom_series(tmp_path, phantom):
    from segmote_core.io.image import ReadLimits, read_limits

    hu, _, spacing = phantom
    write_series(tmp_path / "ct", hu, spacing=spacing)
    need_mb = hu.size * 4 / 2 ** 20                          # int32 HU (16 stored bits - 1024)
    with read_limits(ReadLimits(volume_mb=need_mb / 2)):
        with pytest.raises(ImageReadError, match="per-volume budget") as err:
            open_image(tmp_path / "ct")
    assert str(tmp_path / "ct") in str(err.value)
    with read_limits(ReadLimits(volume_mb=need_mb * 2)):
        assert open_image(tmp_path / "ct").shape == hu.shape


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"])
def test_bundled_jpeg_family_decodes_like_pydicom(tmp_path, name):
    from pydicom.pixels import apply_rescale

    shutil.copy(TEST_FILES / name, tmp_path / name)
    ds = pydicom.dcmread(tmp_path / name)
    img = open_image(tmp_path / name)
    expected = ds.pixel_array
    if "RescaleSlope" in ds and img.axes != "YXC":
        expected = apply_rescale(expected, ds)
    np.testing.assert_array_equal(np.asarray(img.data), expected)
    assert img.meta["dicom"]["transfer_syntax"] == ds.file_meta.TransferSyntaxUID.name


def test_gantry_tilt_keeps_every_slice_at_its_own_position(tmp_path, phantom):
    hu, _, spacing = phantom
    s = write_series(tmp_path / "tilt", hu, spacing=spacing)
    for z, f in enumerate(s.files):        # each slice shifted 1.5 mm along the columns (LPS y)
        ds = pydicom.dcmread(f)
        ipp = np.asarray(ds.ImagePositionPatient, float) + [0.0, 1.5 * z, 0.0]
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.save_as(f)
    img = open_image(tmp_path / "tilt")
    np.testing.assert_array_equal(np.asarray(img.data), hu)
    for z, f in enumerate(s.files):
        lps = np.asarray(pydicom.dcmread(f).ImagePositionPatient, float)
        np.testing.assert_allclose((img.affine @ [z, 0, 0, 1])[:3], LPS_TO_RAS[:3, :3] @ lps,
                                   atol=1e-6)
