"""Readers and writers on real files: NIfTI (RAS and LPS), TIFF stacks, PNG, zarr / OME-Zarr."""

from __future__ import annotations

import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from segmote_core.io import MedicalImage, nifti_to_zyx_affine, open_image, write_labels
from segmote_core.volume import segment_volume_auto

from tests.io.volumes import ct_volume

RAS = np.array([[0.8, 0.0, 0.0, -20.0], [0.0, 0.7, 0.0, 15.0], [0.0, 0.0, 2.5, -40.0],
                [0.0, 0.0, 0.0, 1.0]])


def _lps_of(data_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored with i and j flipped (an LPS voxel order)."""
    nx, ny = data_xyz.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.ascontiguousarray(data_xyz[::-1, ::-1, :]), affine @ flip


def _world_centroid(mask_xyz: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask_xyz).mean(axis=0)
    return (affine @ np.r_[ijk, 1.0])[:3]


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_nifti_labels_overlay_their_source(tmp_path, orientation):
    vol, obj = ct_volume((10, 36, 44))
    data, affine = vol.transpose(2, 1, 0), RAS
    if orientation == "LPS":
        data, affine = _lps_of(data, RAS)
    src = tmp_path / f"ct_{orientation}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)

    img = open_image(src)
    assert img.meta["orientation"] == orientation
    assert img.axes == "ZYX" and img.shape == (10, 36, 44) and img.modality == "CT"
    np.testing.assert_allclose(img.spacing, (2.5, 0.7, 0.8), rtol=1e-6)
    np.testing.assert_allclose(img.affine, nifti_to_zyx_affine(affine))
    # img.affine maps (z, y, x) voxels of img.data to the same world point as the file's affine
    zyx = np.argwhere(np.asarray(img.data) > 120).mean(axis=0)
    truth = _world_centroid(obj.transpose(2, 1, 0), RAS)
    np.testing.assert_allclose((img.affine @ np.r_[zyx, 1.0])[:3], truth, atol=0.5)
    labels = (np.asarray(img.data) > 120).astype(np.uint8)          # the bright object
    out = write_labels(labels, tmp_path / f"labels_{orientation}.nii.gz", like=img)

    back = nib.load(out)
    assert back.shape == data.shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert "".join(nib.aff2axcodes(back.affine)) == orientation
    got = np.asarray(back.dataobj) > 0
    np.testing.assert_array_equal(got, data > 120)                   # voxel for voxel
    # and in world millimetres the labels sit on the object, whatever the storage order
    np.testing.assert_allclose(_world_centroid(got, back.affine), truth, atol=0.5)


def test_ras_and_lps_outputs_agree_in_world_space(tmp_path):
    vol, _ = ct_volume((6, 30, 34))
    outs = []
    for name, (data, aff) in {"ras": (vol.transpose(2, 1, 0), RAS),
                              "lps": _lps_of(vol.transpose(2, 1, 0), RAS)}.items():
        nib.save(nib.Nifti1Image(data, aff), tmp_path / f"{name}.nii")
        img = open_image(tmp_path / f"{name}.nii")
        outs.append(nib.as_closest_canonical(nib.load(write_labels(
            np.asarray(img.data) > 120, tmp_path / f"{name}_labels.nii", like=img))))
    np.testing.assert_array_equal(np.asarray(outs[0].dataobj), np.asarray(outs[1].dataobj))
    np.testing.assert_allclose(outs[0].affine, outs[1].affine, atol=1e-5)


def test_nifti_ppt_segmentation_written_with_source_geometry(tmp_path, tiny_model_128):
    vol, _ = ct_volume((4, 32, 40))
    oblique = RAS.copy()
    oblique[0, 1], oblique[2, 0] = 0.05, 0.02
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), oblique), src)
    img = open_image(src)
    result = segment_volume_auto(tiny_model_128, img, img.modality, chunk=2)
    assert result.labels.shape == vol.shape and result.labels.dtype == np.uint8
    back = nib.load(write_labels(result.labels, tmp_path / "auto.nii.gz", like=img))
    assert back.shape == nib.load(src).shape
    np.testing.assert_allclose(back.affine, oblique, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj).transpose(2, 1, 0), result.labels)
    assert back.header["sform_code"] == nib.load(src).header["sform_code"]


def test_tiff_stack_round_trip(tmp_path):
    vol, obj = ct_volume((7, 24, 30))
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, vol, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 3.0, "unit": "mm"})
    img = open_image(src)
    assert img.axes == "ZYX" and img.data.chunks[0] == (1,) * 7
    np.testing.assert_array_equal(np.asarray(img.data), vol)
    np.testing.assert_allclose(img.spacing, (3.0, 0.5, 0.5))
    labels = obj.astype(np.uint8)
    back_tif = tifffile.imread(write_labels(labels, tmp_path / "labels.tif", like=img))
    assert back_tif.shape == vol.shape
    np.testing.assert_array_equal(back_tif, labels)
    assert open_image(tmp_path / "labels.tif").spacing == pytest.approx((3.0, 0.5, 0.5))
    nii = nib.load(write_labels(labels, tmp_path / "labels.nii.gz", like=img))
    assert nii.shape == (30, 24, 7)
    np.testing.assert_allclose(nii.affine, np.diag([0.5, 0.5, 3.0, 1.0]))


def test_ome_tiff_spacing(tmp_path):
    vol = np.arange(3 * 8 * 9, dtype=np.uint16).reshape(3, 8, 9)
    src = tmp_path / "x.ome.tif"
    tifffile.imwrite(src, vol, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "mm", "PhysicalSizeY": 0.4,
        "PhysicalSizeYUnit": "mm", "PhysicalSizeX": 300.0, "PhysicalSizeXUnit": "\u00b5m"})
    img = open_image(src, modality="MR")
    np.testing.assert_array_equal(np.asarray(img.data), vol)
    assert img.spacing == pytest.approx((2.0, 0.4, 0.3)) and img.modality == "MR"
    tifffile.imwrite(tmp_path / "um.ome.tif", vol, ome=True,      # OME's default unit: µm
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 500.0,
                               "PhysicalSizeX": 250.0})
    assert open_image(tmp_path / "um.ome.tif").spacing == pytest.approx((0.002, 0.5, 0.25))


@pytest.mark.parametrize("kind", ["grey16", "rgb"])
def test_png_round_trip(tmp_path, kind):
    rng = np.random.default_rng(1)
    if kind == "rgb":
        arr = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    else:
        arr = rng.integers(0, 4000, (30, 40), dtype=np.uint16)
    src = tmp_path / f"{kind}.png"
    Image.fromarray(arr).save(src)
    img = open_image(src)
    assert img.axes == ("YXC" if kind == "rgb" else "YX")
    assert img.modality == ("DERM" if kind == "rgb" else "MR")
    np.testing.assert_array_equal(img.data, arr)
    labels = (arr[..., 0] if kind == "rgb" else arr) > arr.mean()
    out = write_labels(labels, tmp_path / f"{kind}_labels.png", like=img)
    back = np.asarray(Image.open(out))
    assert back.shape == arr.shape[:2]
    np.testing.assert_array_equal(back, labels.astype(np.uint8))


def test_jpeg_xray_is_uint8_grey(tmp_path):
    arr = (np.add.outer(np.arange(32), np.arange(48)) * 2).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "xr.jpg", quality=95)
    img = open_image(tmp_path / "xr.jpg")
    assert img.axes == "YX" and img.modality == "XR" and img.shape == (32, 48)


def test_ome_zarr_and_plain_zarr(tmp_path):
    vol = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    root.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": "c", "type": "channel"},
                                   {"name": "z", "unit": "millimeter"}, {"name": "y"},
                                   {"name": "x", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 2.0, 0.5, 250.0]}]}]}]
    root.create_array("0", shape=(1, *vol.shape), dtype=vol.dtype)[...] = vol[None]
    img = open_image(tmp_path / "img.ome.zarr")
    assert img.axes == "ZYX" and img.spacing == (2.0, 0.5, 0.25)
    np.testing.assert_array_equal(np.asarray(img.data), vol)
    np.testing.assert_array_equal(img.slice(2), vol[2])

    out = write_labels((vol > 50).astype(np.uint8), tmp_path / "labels.zarr", like=img)
    back = open_image(out)
    np.testing.assert_array_equal(np.asarray(back.data), vol > 50)
    assert back.spacing == (2.0, 0.5, 0.25)
    np.testing.assert_allclose(back.affine, img.affine)


def test_volumes_are_read_one_slice_at_a_time(tmp_path):
    vol = np.random.default_rng(0).integers(0, 3000, (80, 256, 256), dtype=np.int16)
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), tmp_path / "v.nii")
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), tmp_path / "v.nii.gz")
    for name in ("v.nii", "v.nii.gz"):
        img = open_image(tmp_path / name)
        assert img.data.chunks[0] == (1,) * 80
        tracemalloc.start()
        total = 0
        for z in range(img.n_slices):
            s = img.slice(z)
            total += int(s[5, 7])
            np.testing.assert_array_equal(s, vol[z]) if z in (0, 41, 79) else None
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert total == int(vol[:, 5, 7].astype(np.int64).sum())
        assert peak < vol.nbytes / 5, f"{name}: peak {peak} B for a {vol.nbytes} B volume"


def test_writer_refuses_bad_labels_and_overwriting_the_source(tmp_path):
    vol, _ = ct_volume((3, 10, 12))
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), RAS), src)
    img = open_image(src)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite the source"):
        write_labels(np.zeros(vol.shape, np.uint8), src, like=img)
    assert src.read_bytes() == before
    with pytest.raises(ValueError, match=r"labels shape \(3, 10, 11\) differs"):
        write_labels(np.zeros((3, 10, 11), np.uint8), tmp_path / "l.nii.gz", like=img)
    with pytest.raises(TypeError, match="float32"):
        write_labels(np.zeros(vol.shape, np.float32), tmp_path / "l.nii.gz", like=img)
    with pytest.raises(ValueError, match="PNG holds 2D labels only"):
        write_labels(np.zeros(vol.shape, np.uint8), tmp_path / "l.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]   # no stray temp files


def test_medical_image_slice_bounds(tmp_path):
    img = MedicalImage(np.zeros((4, 5), np.uint8), (1.0, 1.0), np.eye(4), "XR", "YX", "x.png")
    assert img.n_slices == 1 and img.slice(0).shape == (4, 5)
    with pytest.raises(IndexError, match="x.png"):
        img.slice(1)
