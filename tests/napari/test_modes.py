"""2D RGB images, box prompts, mask-prompt refinement, heat maps and error reporting."""

from __future__ import annotations

import numpy as np
import pytest

from segmote_core import SegMoTEPredictor
from segmote_core.sample_images import make_ct_phantom, make_dermoscopy_phantom
from segmote_core.session import mask_to_logits

from napari_segmote.layers import BOXES, COMMITTED, CURRENT, HEATMAP

from tests.napari.helpers import go_to_slice, wait_idle

pytestmark = pytest.mark.gui


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def test_rgb_box_prompt(make_napari_viewer, qtbot, tiny_model_shared):
    viewer = make_napari_viewer()
    viewer.open_sample("segmote", "dermoscopy_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    c = widget.controller
    c.set_model(tiny_model_shared)
    widget.image.value = viewer.layers["Dermoscopy phantom"]
    widget.start()
    assert c.session.rgb and not c.session.is_volume
    img, lesion = make_dermoscopy_phantom()
    ys, xs = np.nonzero(lesion)
    c.layers[BOXES].add_rectangles([[ys.min(), xs.min()], [ys.max(), xs.max()]])
    wait_idle(qtbot, c)
    p = SegMoTEPredictor(tiny_model_shared)
    p.set_image(img, modality="DERM")
    expected = p.predict(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()])).masks[0]
    current = c.layers[CURRENT].data
    assert current.shape == lesion.shape
    np.testing.assert_array_equal(current.astype(bool), expected)
    widget.commit_button.clicked.emit()
    assert c.layers[COMMITTED].data.max() == 1


def test_refine_object_of_labels_layer_and_heatmap(annotator, qtbot, tiny_model_shared):
    viewer, widget = annotator
    c = widget.controller
    vol, ref, _ = make_ct_phantom()
    z = 12
    go_to_slice(viewer, c.image_layer, z)
    widget.heatmap.value = True
    widget.refine_layer.value = viewer.layers["CT phantom reference"]
    widget.refine_id.value = 5
    widget.refine_button.clicked.emit()
    wait_idle(qtbot, c)
    p = SegMoTEPredictor(tiny_model_shared)
    p.set_image(vol[z], modality="CT", window="soft_tissue")
    cfg = tiny_model_shared.config
    logits = mask_to_logits(ref[z] == 5, cfg.resolved_image_size, 4 * cfg.embedding_size)
    pred = p.predict(mask_input=logits)
    np.testing.assert_array_equal(c.layers[CURRENT].data[z].astype(bool), pred.masks[0])
    heat = viewer.layers[HEATMAP]
    assert heat.data.shape == (1, *vol.shape[1:])
    np.testing.assert_allclose(heat.data[0], p.routing_heatmaps()[pred.expert], atol=1e-5)
    assert heat.translate[0] == pytest.approx(z * c.image_layer.scale[0])
    widget.heatmap.value = False
    assert not heat.visible


def test_mask_to_logits_matches_geometry():
    mask = np.zeros((60, 120), bool)
    mask[10:30, 60:120] = True
    logits = mask_to_logits(mask, 256, 64)
    assert logits.shape == (1, 64, 64)
    # longest side 120 -> 256: rows 0..128 of the frame hold the image, the rest is padding
    assert logits[0, 40:, :].max() < 0                  # padding and rows below the mask
    assert logits[0, 8:12, 40:60].min() > 0             # inside the object
    assert logits[0, 8:12, :28].max() < 0               # left of it


def test_errors_become_notifications(make_napari_viewer, notifications, tiny_model_shared):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 8, 8, 8), np.float32), name="4d")
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    widget.start_button.clicked.emit()                  # no model yet
    widget.commit_button.native.click()                 # no session yet (a real click)
    widget.embed_slice_button.native.click()
    widget.controller.set_model(tiny_model_shared)
    widget.image.value = viewer.layers["4d"]
    widget.start_button.clicked.emit()                  # 4D: not a 2D/3D image
    messages = [str(n.message) for n in notifications]
    assert any("no model loaded" in m for m in messages), messages
    assert any("no annotation running" in m for m in messages), messages
    assert any("2D or 3D image" in m for m in messages), messages
    assert widget.status.value.startswith("error")
    viewer.add_image(np.zeros((16, 16), np.uint8), name="ok")   # the viewer still works
    assert "ok" in viewer.layers


def test_failed_checkpoint_is_reported(make_napari_viewer, qtbot, notifications, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    widget.source.value = "checkpoint files"
    widget.segmote_checkpoint.value = bad
    worker = widget.load_model()
    qtbot.waitUntil(lambda: widget._loader is None, timeout=30_000)
    assert widget.controller.model is None
    assert any("broken.safetensors" in str(n.message) for n in notifications), \
        [str(n.message) for n in notifications]
    assert widget.status.value.startswith("error: could not load the model")
    assert worker is not None


def test_embedding_cache_on_disk_is_reused_and_signed(annotator, qtbot, tmp_path,
                                                      notifications):
    import torch

    from segmote_core import SegMoTEConfig, build_segmote

    viewer, widget = annotator
    c = widget.controller
    widget.cache_dir.value = tmp_path
    session = widget.start()
    widget.embed_volume_button.clicked.emit()
    wait_idle(qtbot, c)
    first = session.store.get(7)["image_embeddings"].copy()
    (store_path,) = tmp_path.glob("embeddings-*.zarr")

    session = widget.start()                                  # a new session: from disk
    assert len(session.store) == 0                            # nothing in memory yet
    assert list(session.embedding_steps()) == [(0, 0)]        # nothing left to compute
    np.testing.assert_array_equal(session.store.get(7)["image_embeddings"], first)

    torch.manual_seed(1)                                      # another model: refused
    c.set_model(build_segmote(SegMoTEConfig(model_type="tiny")))
    widget.start_button.clicked.emit()
    assert any("computed for other inputs" in str(n.message) for n in notifications)
    assert store_path.exists()
