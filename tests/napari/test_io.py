"""Reader and writer contributions through a real viewer: NIfTI and cohort zarr round trips."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import zarr

from segmote_core.sample_images import make_ct_phantom

from napari_segmote._reader import napari_get_reader
from napari_segmote.layers import COMMITTED

pytestmark = pytest.mark.gui

#: an oblique, LPS-flipped affine with an offset: a writer that drops it cannot pass
AFFINE = np.array([[-0.8, 0.05, 0.0, 120.0],
                   [0.0, -0.75, 0.1, 95.5],
                   [0.02, 0.0, 2.5, -40.0],
                   [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def nifti_ct(tmp_path):
    vol, ref, _ = make_ct_phantom(shape=(12, 64, 80))          # (Z, Y, X)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), AFFINE), path)   # NIfTI (i, j, k) = (X, Y, Z)
    return path, vol, ref


def test_reader_declines_unknown_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    assert napari_get_reader(str(tmp_path / "a.png")) is None
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    assert napari_get_reader(str(plain)) is None


def test_nifti_read_annotate_write_keeps_affine(make_napari_viewer, nifti_ct, tmp_path,
                                                tiny_model_shared):
    path, vol, ref = nifti_ct
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="segmote")
    assert layer.data.shape == vol.shape
    np.testing.assert_array_equal(np.asarray(layer.data), vol)
    meta = layer.metadata["segmote"]
    assert meta["modality"] == "CT"
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    widget.controller.set_model(tiny_model_shared)
    widget.image.value = layer
    session = widget.start()
    session.current[4:8][ref[4:8] == 3] = 1
    widget.commit_button.clicked.emit()
    committed = viewer.layers[COMMITTED]
    assert committed.data.max() == 1

    out = tmp_path / "labels.nii.gz"
    written = committed.save(str(out), plugin="segmote")
    assert written == [str(out)]
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-5)
    assert back.shape == nib.load(path).shape
    np.testing.assert_array_equal(np.asarray(back.dataobj).transpose(2, 1, 0),
                                  committed.data)

    (reread,) = viewer.open(str(out), plugin="segmote")           # labels NIfTI read back
    np.testing.assert_array_equal(np.asarray(reread.data), committed.data)
    np.testing.assert_allclose(reread.metadata["segmote"]["affine"], meta["affine"])

    out_zarr = tmp_path / "labels.zarr"
    assert committed.save(str(out_zarr), plugin="segmote") == [str(out_zarr)]
    arr = zarr.open_group(str(out_zarr), mode="r")["labels"]
    np.testing.assert_array_equal(arr[:], committed.data)
    np.testing.assert_allclose(arr.attrs["affine"], meta["affine"])
    np.testing.assert_allclose(arr.attrs["spacing"], layer.scale)


def test_cohort_case_opens_with_labels(make_napari_viewer, tmp_path):
    from segmote_core.io import create_cohort, write_case

    vol, ref, spacing = make_ct_phantom(shape=(10, 48, 48))
    root = tmp_path / "cohort.zarr"
    create_cohort(str(root))
    write_case(str(root), "case_001", vol, spacing=spacing, affine=AFFINE, modality="CT",
               labels=ref, attrs={"categories": {"5": "kidney"}})
    write_case(str(root), "case_002", vol[:4], spacing=spacing, affine=AFFINE, modality="CT")
    viewer = make_napari_viewer()
    layers = viewer.open(str(root / "case_001"), plugin="segmote")
    assert [lay.name for lay in layers] == ["case_001", "case_001 labels"]
    image, labels = layers
    np.testing.assert_array_equal(np.asarray(image.data), vol)
    np.testing.assert_array_equal(np.asarray(labels.data), ref)
    np.testing.assert_allclose(image.scale, spacing)
    np.testing.assert_allclose(image.metadata["segmote"]["affine"], AFFINE)
    assert len(viewer.open(str(root), plugin="segmote")) == 3   # root: both cases (+labels)
