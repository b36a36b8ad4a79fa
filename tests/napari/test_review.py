"""The Review panel on a real viewer: open a batch output worst first, edit a slice, Save, Next,
reopen shows the edit; unsaved edits are not dropped silently; the queue survives a new viewer;
the reader opens an output store or one case with the QC in the layer metadata."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.store import OutputStore
from segmote_core.io import create_cohort, write_case
from segmote_core.review import read_correction

pytestmark = pytest.mark.gui

QC = {"vol_a": [0.9, 0.3, 0.8, 0.95], "vol_b": [0.7, 0.75, 0.8, 0.6], "skin": [0.97]}


@pytest.fixture
def output(tmp_path):
    """A cohort of two volumes and a 2D image, and a batch output with per-slice QC."""
    rng = np.random.default_rng(0)
    cohort = tmp_path / "cohort.zarr"
    create_cohort(cohort)
    images = {"vol_a": rng.normal(0, 1, (4, 32, 40)).astype(np.float32),
              "vol_b": rng.normal(0, 1, (4, 32, 40)).astype(np.float32),
              "skin": rng.integers(0, 255, (30, 30), dtype=np.uint8)}
    for case_id, image in images.items():
        write_case(cohort, case_id, image, spacing=(2.0, 0.5, 0.5) if image.ndim == 3
                   else (0.1, 0.1), modality="MR" if image.ndim == 3 else "XR")
    out = tmp_path / "labels.zarr"
    pre = {}
    with OutputStore(out, cohort, {"model": "test"}) as st:
        for case_id, image in images.items():
            lab = np.zeros(image.shape, np.uint8)
            lab[..., 8:20, 10:24] = 1
            pre[case_id] = lab
            st.begin(case_id, lab.shape)
            st.write(case_id, 0, lab if lab.ndim == 3 else lab[None])
            n = len(QC[case_id])
            st.finish(case_id, np.full(n, 0.3), np.zeros(n, np.int16),
                      {"mode": "auto", "qc": QC[case_id], "qc_case": min(QC[case_id])})
    from pipeline.report import case_row, write_review_queue

    write_review_queue(out, [case_row(c, "done", slices=len(q), qc=q) for c, q in QC.items()])
    return out, cohort, pre


def _review(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE review")
    return viewer, widget


def test_open_edit_save_next_reopen(make_napari_viewer, output, qtbot, tiny_model_shared):
    from napari_segmote.layers import COMMITTED

    out, _, pre = output
    viewer, widget = _review(make_napari_viewer)
    entries = widget.load(out)
    assert [e.case for e in entries] == ["vol_a", "vol_b", "skin"]  # lowest QC first
    assert [e.status for e in entries] == ["pending"] * 3
    assert len(widget.queue.choices) == 3 and "pending" in widget.queue.choices[0]
    widget.open_case("vol_a")
    labels = viewer.layers[COMMITTED]
    image = viewer.layers["vol_a"]
    np.testing.assert_array_equal(labels.data, pre["vol_a"])
    assert tuple(labels.scale) == tuple(image.scale) == (2.0, 0.5, 0.5)
    assert labels.metadata["segmote"]["qc"] == QC["vol_a"]
    # the view jumps to the worst slice, and the worst slices are listed worst first
    assert int(round(viewer.dims.point[0] / 2.0)) == 1
    assert widget.worst.choices[0].startswith("slice 1: QC 0.30")
    # paint on slice 1 with napari's brush
    labels.brush_size = 3
    labels.paint((1, 25, 30), 2)
    assert widget.dirty()
    edited = np.array(labels.data)
    # switching with unsaved edits asks first; "no" keeps the case open
    asked = []
    widget.confirm = lambda q: asked.append(q) or False
    assert widget.next() is None and widget.case == "vol_a" and "unsaved" in asked[0]
    widget.save()
    got, attrs = read_correction(out, "vol_a")
    np.testing.assert_array_equal(got, edited)
    assert attrs["reviewed"] is True and attrs["edited_slices"] == [1]
    assert attrs["prelabel_signature"] and attrs["saved_at"].endswith("Z")
    assert not widget.dirty() and "reviewed" in widget.queue.choices[0]
    assert widget.next() == "vol_b" and widget.case == "vol_b"
    np.testing.assert_array_equal(viewer.layers[COMMITTED].data, pre["vol_b"])
    assert "vol_a" not in viewer.layers  # the previous case's image went
    # reopening the reviewed case shows the saved correction
    widget.open_case("vol_a")
    np.testing.assert_array_equal(viewer.layers[COMMITTED].data, edited)
    # the annotator adopts the open labels as its committed objects (refine / add objects)
    annotator = widget.annotate()
    assert "load a model" in widget.status.value
    annotator.controller.set_model(tiny_model_shared)
    widget.annotate()
    np.testing.assert_array_equal(annotator.controller.session.committed, edited)
    assert annotator.controller.image_layer is viewer.layers["vol_a"] and not widget.dirty()
    # the queue survives closing napari: a new viewer reads the statuses back
    viewer2, widget2 = _review(make_napari_viewer)
    assert [e.status for e in widget2.load(out)] == ["reviewed", "pending", "pending"]
    assert widget2.next() == "vol_b"


def test_next_worst_slice_walks_the_cohort(make_napari_viewer, output):
    from napari_segmote.layers import COMMITTED

    out, _, _ = output
    viewer, widget = _review(make_napari_viewer)
    widget.load(out)
    # the cohort's slices lowest QC first, whatever the case: vol_a 1 (0.3), vol_b 3 (0.6), ...
    assert [(e.case, e.slice) for e in widget.slices][:4] == [("vol_a", 1), ("vol_b", 3),
                                                              ("vol_b", 0), ("vol_b", 1)]
    got = widget.next_slice()
    assert (got.case, got.slice, widget.case) == ("vol_a", 1, "vol_a")
    assert int(round(viewer.dims.point[0] / 2.0)) == 1
    viewer.layers[COMMITTED].paint((1, 25, 30), 2)
    asked = []
    widget.confirm = lambda q: asked.append(q) or False   # unsaved edits: "no" stays
    assert widget.next_slice() is None and widget.case == "vol_a" and asked
    widget.save()
    got = widget.next_slice()
    assert (got.case, got.slice, widget.case) == ("vol_b", 3, "vol_b")
    assert int(round(viewer.dims.point[0] / 2.0)) == 3
    assert "slice 2 of 9" in widget.status.value
    widget.save()
    # vol_a and vol_b reviewed: their slices are skipped, the 2D case is left
    got = widget.next_slice()
    assert (got.case, got.slice) == ("skin", 0)
    widget.save()
    assert widget.next_slice() is None and "every case is reviewed" in widget.status.value


def test_reader_opens_an_output_store_or_a_case(make_napari_viewer, output, tmp_path):
    from napari_segmote._reader import napari_get_reader

    out, cohort, pre = output
    reader = napari_get_reader(str(out))
    assert reader is not None
    layers = reader(str(out))
    (img, img_kw, img_kind), (lab, lab_kw, lab_kind) = layers
    assert (img_kind, lab_kind) == ("image", "labels") and img_kw["name"] == "vol_a"
    np.testing.assert_array_equal(lab, pre["vol_a"])
    assert lab_kw["scale"] == img_kw["scale"]
    assert lab_kw["metadata"]["segmote"]["qc"] == QC["vol_a"]
    assert lab_kw["metadata"]["segmote"]["labels_source"] == "pre-label"
    viewer = make_napari_viewer()
    viewer.open(str(out / "skin"), plugin="segmote")
    assert viewer.layers["skin pre-label"].metadata["segmote"]["qc"] == QC["skin"]
    assert viewer.layers["skin pre-label"].data.shape == (30, 30)
    shutil.move(cohort, tmp_path / "elsewhere.zarr")
    with pytest.raises(ValueError, match="not where the store records it") as err:
        napari_get_reader(str(out / "vol_b"))(str(out / "vol_b"))
    assert str(cohort) in str(err.value)
