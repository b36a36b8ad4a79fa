"""The dock widget in a real napari viewer (under Xvfb): prompts, commit, undo, auto, threads."""

from __future__ import annotations

import numpy as np
import pytest

from segmote_core import SegMoTEPredictor
from segmote_core.sample_images import make_ct_phantom

from napari_segmote.layers import BOXES, COMMITTED, CURRENT, POINTS

from tests.napari.helpers import bright_centre, go_to_slice, open_annotator, wait_idle

pytestmark = pytest.mark.gui


def _expected(model, image: np.ndarray, **prompt) -> np.ndarray:
    p = SegMoTEPredictor(model)
    p.set_image(image, modality="CT", window="soft_tissue")
    return p.predict(**prompt).masks[0]


def test_point_prompt_predicts_on_its_slice(annotator, qtbot, tiny_model_shared):
    viewer, widget = annotator
    c = widget.controller
    vol, ref, _ = make_ct_phantom()
    z = 12
    go_to_slice(viewer, c.image_layer, z)
    assert c.z == z
    y, x = bright_centre(ref, 5, z)
    c.layers[POINTS].add([[z, y, x]])
    wait_idle(qtbot, c)           # the slice embedding runs in a worker, then the decoder
    current = c.layers[CURRENT].data
    assert current.shape == vol.shape
    expected = _expected(tiny_model_shared, vol[z], point_coords=np.array([[x, y]]),
                         point_labels=np.array([1]))
    assert expected.any()
    np.testing.assert_array_equal(current[z].astype(bool), expected)
    assert not np.delete(current, z, axis=0).any()          # no other slice touched
    assert "expert" in widget.status.value and "confidence" in widget.status.value



def _prompt(c, qtbot, z: int, y: float, x: float) -> None:
    c.layers[POINTS].add([[z, y, x]])
    wait_idle(qtbot, c)


def test_commit_increments_ids_keeps_objects_and_undo_restores(annotator, qtbot):
    viewer, widget = annotator
    c = widget.controller
    _, ref, _ = make_ct_phantom()
    z = 12
    go_to_slice(viewer, c.image_layer, z)
    _prompt(c, qtbot, z, *bright_centre(ref, 5, z))
    first = c.layers[CURRENT].data.astype(bool).copy()
    assert first.any()
    widget.commit_button.clicked.emit()
    committed = c.layers[COMMITTED].data
    np.testing.assert_array_equal(committed == 1, first)
    assert not c.layers[CURRENT].data.any() and len(c.layers[POINTS].data) == 0

    go_to_slice(viewer, c.image_layer, 5)
    _prompt(c, qtbot, 5, *bright_centre(ref, 4, 5))
    second = c.layers[CURRENT].data.astype(bool).copy()
    assert second.any()
    widget.commit_button.clicked.emit()
    np.testing.assert_array_equal(committed == 1, first)          # earlier object kept
    np.testing.assert_array_equal(committed == 2, second & ~first)
    assert set(np.unique(committed)) == {0, 1, 2}

    widget.undo_button.clicked.emit()
    np.testing.assert_array_equal(committed == 1, first)
    assert not (committed == 2).any()
    widget.undo_button.clicked.emit()
    assert not committed.any()
    widget.undo_button.clicked.emit()                              # nothing left: no error
    assert "nothing to undo" in widget.status.value

    committed[3, 5:9, 5:9] = 4                                     # e.g. painted by hand
    widget.start()                                                 # a restart keeps objects
    assert (c.layers[COMMITTED].data == 4).sum() == 16
    assert c.session.next_label() == 5


def test_clear_and_keyboard_shortcuts(annotator, qtbot):
    from napari.utils.key_bindings import KeyBinding

    viewer, widget = annotator
    c = widget.controller
    _, ref, _ = make_ct_phantom()
    go_to_slice(viewer, c.image_layer, 12)
    _prompt(c, qtbot, 12, *bright_centre(ref, 5, 12))
    keys = {str(k): f for k, f in viewer.keymap.items()}
    for key in ("Shift-C", "Shift-X", "Shift-U", "Shift-N", "Shift-T"):
        assert str(KeyBinding.from_str(key)) in keys
    press = lambda key: keys[str(KeyBinding.from_str(key))](viewer)  # noqa: E731
    press("Shift-X")                                               # clear
    assert not c.layers[CURRENT].data.any() and len(c.layers[POINTS].data) == 0
    _prompt(c, qtbot, 12, *bright_centre(ref, 5, 12))
    press("Shift-C")                                               # commit
    assert c.layers[COMMITTED].data.max() == 1
    press("Shift-N")                                               # next slice
    assert c.z == 13
    c.layers[POINTS].add([[13, 60.0, 60.0]])                    # positive, stays selected
    press("Shift-T")                                               # negative points
    c.layers[POINTS].add([[13, 40.0, 40.0]])
    wait_idle(qtbot, c)
    points = c.layers[POINTS]
    assert points.features["positive"].tolist() == [True, False]
    np.testing.assert_allclose(points.face_color[:, :3], [[0, 1, 0], [1, 0, 0]])
    assert c.prompts()["labels"].tolist() == [1, 0]
    press("Shift-U")                                               # undo
    assert not c.layers[COMMITTED].data.any()


def test_auto_segments_volume_without_prompts(annotator, qtbot, tiny_model_shared):
    viewer, widget = annotator
    c = widget.controller
    vol, _, _ = make_ct_phantom()
    widget.auto_volume_button.clicked.emit()
    wait_idle(qtbot, c)
    assert len(c.layers[POINTS].data) == 0 and len(c.layers[BOXES].data) == 0
    current = c.layers[CURRENT].data
    assert c.session.store.missing(range(vol.shape[0])) == []
    for z in (0, 12, 23):
        np.testing.assert_array_equal(current[z].astype(bool),
                                      _expected(tiny_model_shared, vol[z], auto=True))
    assert current.any()


def test_gui_thread_not_blocked_while_embedding_volume(annotator, qtbot):
    import time

    from qtpy.QtCore import QTimer

    viewer, widget = annotator
    c = widget.controller
    stamps: list[float] = []
    running: list[bool] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: (stamps.append(time.perf_counter()),
                                   running.append(c.worker is not None)))
    timer.start()
    t0 = time.perf_counter()
    widget.embed_volume_button.clicked.emit()
    assert c.worker is not None                                    # returned at once
    wait_idle(qtbot, c)
    elapsed = time.perf_counter() - t0
    timer.stop()
    assert c.session.store.missing(range(24)) == []
    ticks_while_running = sum(running)
    gaps = np.diff(stamps)
    print(f"embedding 24 slices took {elapsed:.2f} s; timer ticks while running: "
          f"{ticks_while_running}; longest gap between ticks {gaps.max() * 1000:.0f} ms")
    assert ticks_while_running >= 10
    assert gaps.max() < max(1.0, 0.25 * elapsed)                   # never blocked for long


def test_cancel_stops_embedding(annotator, qtbot):
    viewer, widget = annotator
    c = widget.controller
    widget.embed_volume_button.clicked.emit()
    qtbot.waitUntil(lambda: len(c.session.store) >= 1, timeout=30_000)
    widget.cancel_button.clicked.emit()
    wait_idle(qtbot, c)
    assert 1 <= len(c.session.store) < 24


def test_prompt_during_volume_embedding_is_decoded_after_it(annotator, qtbot, tiny_model_shared):
    viewer, widget = annotator
    c = widget.controller
    vol, ref, _ = make_ct_phantom()
    widget.embed_volume_button.clicked.emit()
    z = 20                                         # embedded last: still missing now
    go_to_slice(viewer, c.image_layer, z)
    y, x = bright_centre(ref, 4, z)
    c.layers[POINTS].add([[z, y, x]])            # no "busy" error: queued
    assert "waiting" in widget.status.value
    wait_idle(qtbot, c)
    expected = _expected(tiny_model_shared, vol[z], point_coords=np.array([[x, y]]),
                         point_labels=np.array([1]))
    np.testing.assert_array_equal(c.layers[CURRENT].data[z].astype(bool), expected)


def test_segment_volume_propagates_from_prompted_slice(annotator, qtbot, tiny_model_shared):
    from segmote_core.volume import PredictorSegmenter, SlicePrompt, propagate

    viewer, widget = annotator
    c = widget.controller
    vol, ref, _ = make_ct_phantom()
    z = 12
    go_to_slice(viewer, c.image_layer, z)
    ys, xs = np.nonzero(ref[z] == 5)
    box = [xs.min(), ys.min(), xs.max(), ys.max()]
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    c.layers[BOXES].add_rectangles([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]])
    wait_idle(qtbot, c)
    seed = c.layers[CURRENT].data[z].astype(bool).copy()
    widget.propagate_button.clicked.emit()
    wait_idle(qtbot, c)
    res = c.session.propagation
    assert res is not None and res.stops                      # both directions ended
    current = c.layers[CURRENT].data
    # the core call with the same prompt (over the embeddings the plugin computed) agrees
    expected = propagate(PredictorSegmenter(SegMoTEPredictor(tiny_model_shared), vol, "CT",
                                            "soft_tissue", cache=c.session.store),
                         {z: SlicePrompt(box=np.array(box, np.float32))})
    np.testing.assert_array_equal(current.astype(bool), expected.mask)
    np.testing.assert_array_equal(current[z].astype(bool), seed)   # the prompted slice kept
    filled = res.slices
    assert z in filled and filled == list(range(filled[0], filled[-1] + 1))  # contiguous
    outside = [k for k in range(vol.shape[0]) if k not in filled]
    assert not current[outside].any()
    assert f"object on {len(filled)} slices" in widget.status.value

    widget.max_slices.value = 2                                # a bounded propagation
    widget.propagate_button.clicked.emit()
    wait_idle(qtbot, c)
    reached = c.session.propagation.slices
    assert set(reached) <= set(range(z - 2, z + 3)) and z in reached
    assert not np.delete(c.layers[CURRENT].data, reached, axis=0).any()
    assert {s.reason for s in c.session.propagation.stops} <= {
        "max_slices", "empty", "no_overlap", "leak"}


def test_partial_redraw_shows_what_a_full_refresh_shows(annotator, qtbot):
    """Prompt changes redraw only the changed pixels; the canvas must match a full refresh."""
    viewer, widget = annotator
    c = widget.controller
    _, ref, _ = make_ct_phantom()
    z = 12
    go_to_slice(viewer, c.image_layer, z)
    current = c.layers[CURRENT]
    viewer.window.show()              # a hidden canvas renders black screenshots

    def cyan_pixels() -> tuple[np.ndarray, int]:
        for layer in viewer.layers:  # the current object alone on a black canvas (making a
            if layer.name != CURRENT:  # layer visible refreshes it: never touch CURRENT)
                layer.visible = False
        shot = viewer.screenshot(canvas_only=True, flash=False)
        return shot, int((shot[..., 2].astype(int) > 60).sum())

    empty, n0 = cyan_pixels()
    assert n0 == 0
    masks = []
    for label in (5, 3):
        y, x = bright_centre(ref, label, z)
        c.layers[POINTS].data = np.array([[z, y, x]])   # a moved prompt, as a drag does
        wait_idle(qtbot, c)
        masks.append(current.data[z].astype(bool).copy())
        assert masks[-1].any()
        partial, n = cyan_pixels()
        current.refresh()
        full, n_full = cyan_pixels()
        assert n > 0 and n == n_full
        np.testing.assert_array_equal(partial, full)
    assert (masks[0] != masks[1]).sum() > 100   # the second prompt really redrew something
    c.layers[POINTS].data = np.empty((0, 3))            # no prompt: the mask is cleared
    wait_idle(qtbot, c)
    assert not current.data[z].any() and cyan_pixels()[1] == 0


def test_category_text_guide_reaches_the_decoder(make_napari_viewer, qtbot):
    """The category combo lists the model's vocabulary; its text token joins the prompt."""
    import torch

    from segmote_core import SegMoTEConfig, build_segmote

    torch.manual_seed(4)
    model = build_segmote(SegMoTEConfig(model_type="tiny", vocabulary=("kidney", "liver")))
    viewer, widget = open_annotator(make_napari_viewer, model)
    c = widget.controller
    assert list(widget.category.choices) == [None, "kidney", "liver"]
    vol, ref, _ = make_ct_phantom()
    z = 12
    go_to_slice(viewer, c.image_layer, z)
    y, x = bright_centre(ref, 3, z)
    _prompt(c, qtbot, z, y, x)
    prompt = dict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))
    plain = _expected(model, vol[z], **prompt)
    np.testing.assert_array_equal(c.layers[CURRENT].data[z].astype(bool), plain)
    for name in ("liver", "kidney"):
        widget.category.value = name          # re-runs the decoder on the current prompts
        guided = _expected(model, vol[z], text=name, **prompt)
        np.testing.assert_array_equal(c.layers[CURRENT].data[z].astype(bool), guided)
    assert (_expected(model, vol[z], text="liver", **prompt)
            != _expected(model, vol[z], text="kidney", **prompt)).any()
    widget.category.value = None
    np.testing.assert_array_equal(c.layers[CURRENT].data[z].astype(bool), plain)
