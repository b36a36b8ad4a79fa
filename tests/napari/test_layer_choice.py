"""The annotator picks the image to annotate as micro-sam does, and readers name their axes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from segmote_core.sample_images import make_ct_phantom, make_dermoscopy_phantom

pytestmark = pytest.mark.gui


def _chosen(widget) -> str | None:
    """The name of the widget's image choice (napari gives plugins proxies of its layers)."""
    return None if widget.image.value is None else widget.image.value.name


def _open_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    return widget


def test_widget_picks_the_only_image_and_follows_the_selection(make_napari_viewer,
                                                               tiny_model_shared):
    viewer = make_napari_viewer()
    vol, ref, spacing = make_ct_phantom(shape=(8, 64, 64))
    ct = viewer.add_image(vol, name="CT", scale=spacing)
    viewer.layers.selection.clear()                 # not selected: still the only image
    widget = _open_widget(viewer)
    assert _chosen(widget) == ct.name
    widget.controller.set_model(tiny_model_shared)
    session = widget.start()                        # no "got None": starts on the CT at once
    assert session.shape == vol.shape and widget.controller.image_layer.name == "CT"

    img, _ = make_dermoscopy_phantom(size=64)
    derm = viewer.add_image(img, name="Dermoscopy", rgb=True)   # napari selects a new layer
    assert _chosen(widget) == derm.name
    viewer.layers.selection.active = ct
    assert _chosen(widget) == ct.name
    viewer.layers.selection.active = viewer.layers["SegMoTE points"]   # not an image: kept
    assert _chosen(widget) == ct.name
    viewer.add_labels(ref, name="reference", scale=spacing)
    assert _chosen(widget) == ct.name
    viewer.layers.selection.active = derm
    assert _chosen(widget) == derm.name
    viewer.layers.remove(derm)
    assert _chosen(widget) == "CT"              # the only image left
    viewer.layers.selection.active = ct
    assert _chosen(widget) == ct.name


def test_widget_leaves_the_choice_empty_between_unselected_images(make_napari_viewer):
    viewer = make_napari_viewer()
    a = viewer.add_image(np.zeros((32, 32), np.float32), name="a")
    viewer.add_image(np.ones((32, 32), np.float32), name="b")
    viewer.layers.selection.clear()
    widget = _open_widget(viewer)
    assert _chosen(widget) is None              # two candidates, none selected: no guess
    viewer.layers.selection.active = a
    assert _chosen(widget) == a.name


def test_readers_name_the_axes(make_napari_viewer, tmp_path):
    vol, _, _ = make_ct_phantom(shape=(10, 48, 40))
    volume_path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.diag([0.8, 0.8, 2.5, 1.0])),
             volume_path)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(volume_path), plugin="segmote")
    assert layer.axis_labels == ("z", "y", "x")
    assert viewer.dims.axis_labels == ("z", "y", "x")
    widget = _open_widget(viewer)
    assert _chosen(widget) == layer.name        # the active layer after opening

    flat_path = tmp_path / "xray.nii.gz"
    nib.save(nib.Nifti1Image(vol[4].T.copy(), np.eye(4)), flat_path)
    flat_viewer = make_napari_viewer()
    (flat,) = flat_viewer.open(str(flat_path), plugin="segmote")
    assert flat.data.ndim == 2 and flat.axis_labels == ("y", "x")
    assert flat_viewer.dims.axis_labels == ("y", "x")

    samples = make_napari_viewer()
    samples.open_sample("segmote", "ct_phantom")
    assert samples.dims.axis_labels == ("z", "y", "x")
