"""Reader/writer edge cases: qform-only LPS NIfTI, trailing singleton axes, scaled data, a
folder that is not a zarr store, a 16-bit TIFF plane."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile

from segmote_core.io import ImageReadError, open_image, write_labels


def _vol() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, (6, 20, 24)).astype(np.int16)


def test_qform_only_lps_nifti_round_trips(tmp_path):
    vol = _vol()
    aff = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    src = nib.Nifti1Image(vol.transpose(2, 1, 0), None)
    src.set_qform(aff, code=1)
    src.set_sform(None, code=0)
    nib.save(src, tmp_path / "q.nii.gz")
    img = open_image(tmp_path / "q.nii.gz")
    assert img.meta["orientation"] == "LPS" and img.shape == (6, 20, 24)
    back = nib.load(write_labels(np.asarray(img.data) > 0, tmp_path / "l.nii.gz", like=img))
    assert back.shape == (24, 20, 6) and "".join(nib.aff2axcodes(back.affine)) == "LPS"
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (1, 0)
    np.testing.assert_array_equal(np.asarray(back.dataobj) > 0, vol.transpose(2, 1, 0) > 0)


@pytest.mark.parametrize("extra", [(1,), ()])
def test_trailing_singletons_and_single_slice(tmp_path, extra):
    vol = _vol()
    data = vol.transpose(2, 1, 0)[(...,) + (None,) * len(extra)]
    if not extra:
        data = data[:, :, :1]                              # one slice: (X, Y, 1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    img = open_image(tmp_path / "v.nii.gz")
    z = 6 if extra else 1
    assert img.axes == "ZYX" and img.shape == (z, 20, 24)
    np.testing.assert_array_equal(np.asarray(img.data), vol[:z])
    back = nib.load(write_labels(np.ones(img.shape, np.uint8), tmp_path / "l.nii", like=img))
    assert back.shape == (24, 20, z)


def test_scaled_nifti_reads_physical_values(tmp_path):
    vol = _vol()
    src = nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4))
    src.header.set_slope_inter(0.5, -10)
    nib.save(src, tmp_path / "s.nii")
    img = open_image(tmp_path / "s.nii")
    np.testing.assert_allclose(np.asarray(img.data), vol * 0.5 - 10)


def test_folder_that_is_not_a_zarr_store(tmp_path):
    (tmp_path / "nothing.zarr").mkdir()
    with pytest.raises(ImageReadError, match=r"nothing\.zarr: not a zarr store"):
        open_image(tmp_path / "nothing.zarr")


def test_2d_uint16_tiff_labels_round_trip(tmp_path):
    arr = np.random.default_rng(2).integers(0, 60000, (18, 22), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", arr)
    img = open_image(tmp_path / "g.tif")
    assert img.axes == "YX" and img.modality == "MR"
    lab = (arr > 30000).astype(np.uint8)
    np.testing.assert_array_equal(tifffile.imread(write_labels(lab, tmp_path / "l.tif", like=img)),
                                  lab)


def test_nan_only_on_the_sampled_slices_is_not_nan_filled(tmp_path):
    a = np.full((4, 4, 5), np.nan, np.float32)              # (X, Y, Z): slices 0, 2, 4 all NaN
    a[..., 1] = 7.0
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "p.nii.gz")
    img = open_image(tmp_path / "p.nii.gz")
    assert img.shape == (5, 4, 4) and float(np.asarray(img.slice(1)).max()) == 7.0
    a[..., 1] = np.inf
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "all.nii.gz")
    with pytest.raises(ImageReadError, match=r"all\.nii\.gz: all values of all 5 slices are NaN"):
        open_image(tmp_path / "all.nii.gz")
