"""The label table of ``segmote batch --categories`` reaches the plugin: the annotator's Auto
(PPT) buttons segment the selected category, and an output store's labels layer names its
values by category (docs/napari.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from segmote_core import SegMoTEConfig, build_segmote
from segmote_core.volume import segment_volume_auto

from napari_segmote._reader import label_features, output_case_layers
from napari_segmote.layers import CURRENT

from tests.napari.helpers import go_to_slice, open_annotator, wait_idle

VOCAB = ("liver", "kidney", "spine")


@pytest.fixture(scope="module")
def category_model():
    """Random tiny SegMoTE with a vocabulary; text tokens scaled so categories answer apart."""
    torch.manual_seed(1)
    model = build_segmote(SegMoTEConfig(model_type="tiny", vocabulary=VOCAB))
    with torch.no_grad():
        model.text_encoder.table.weight.normal_(0.0, 3.0)
    return model.eval()


@pytest.mark.gui
def test_auto_buttons_segment_the_selected_category(make_napari_viewer, qtbot, category_model):
    viewer, widget = open_annotator(make_napari_viewer, category_model)
    c = widget.controller
    layer = viewer.layers["CT phantom"]
    z = 5
    go_to_slice(viewer, layer, z)
    got = {}
    for name in (None, "kidney", "spine"):
        widget.category.value = name
        widget.clear_button.clicked.emit()
        widget.auto_slice_button.clicked.emit()
        wait_idle(qtbot, c)
        got[name] = np.asarray(c.layers[CURRENT].data[z]).astype(bool)
        s = c.session
        want = segment_volume_auto(category_model, np.asarray(layer.data), s.modality,
                                   window=s.window, slices=[z], text=name,
                                   precision="bf16" if s.predictor.bf16 else "fp32")
        np.testing.assert_array_equal(got[name], np.asarray(want.labels[z]).astype(bool))
    assert not np.array_equal(got["kidney"], got["spine"])  # the category changed the answer


def test_output_labels_are_named_by_category(tmp_path):
    from segmote_core.io import create_cohort, write_case
    from segmote_core.review import open_output

    cohort = tmp_path / "cohort.zarr"
    create_cohort(cohort)
    write_case(cohort, "case", np.zeros((3, 16, 16), np.int16))
    out = tmp_path / "out.zarr"
    table = {"1": "liver", "2": "kidney", "3": "spine"}
    root = zarr.open_group(str(out), mode="w")
    root.attrs.update({"segmote": {"kind": "labels", "version": 1}, "cohort": str(cohort),
                       "signature_sha256": "abc", "label_table": table})
    arr = root.create_group("case").create_array("labels", shape=(3, 16, 16), dtype="uint8",
                                                 chunks=(1, 16, 16))
    arr[1, 2:5, 2:5] = 2
    arr.attrs.update({"signature_sha256": "abc", "complete": True, "label_table": table})
    (_, _, _), (data, kwargs, kind) = output_case_layers(open_output(out), "case")
    assert kind == "labels"
    assert kwargs["metadata"]["segmote"]["label_table"] == table
    assert kwargs["features"] == {"index": [0, 1, 2, 3],
                                  "category": ["background", "liver", "kidney", "spine"]}
    from napari.layers import Labels

    assert data[1, 3, 3] == 2
    lab = Labels(data[1], features=kwargs["features"])  # slice 1, data coordinates
    assert lab.get_status((3, 3))["value"] == "2; category: kidney"
    assert label_features(None) == {}
