"""The annotation session (segmote_core.session) without a viewer: prompts from layer data,
embeddings, commit/undo, PPT auto mode, sample images."""

from __future__ import annotations

import numpy as np
import pytest

from segmote_core import SegMoTEPredictor
from segmote_core.progress import CancelToken, Cancelled

from segmote_core.embeddings import EmbeddingStore
from segmote_core.prompts import box_on_slice, object_mask, points_on_slice
from segmote_core.sample_images import CT_CATEGORIES, make_ct_phantom, make_dermoscopy_phantom
from segmote_core.session import AnnotationSession, MissingEmbeddingError
from segmote_core.volume import segment_volume_auto


@pytest.fixture
def volume_session(tiny_model_256):
    vol, ref, _ = make_ct_phantom(shape=(8, 64, 64))
    return AnnotationSession(vol, SegMoTEPredictor(tiny_model_256), modality="CT"), vol, ref


def test_points_and_boxes_from_layer_data():
    data = np.array([[3, 10.0, 20.0], [3.2, 11.0, 21.0], [4, 5.0, 6.0]])
    coords, labels = points_on_slice(data, [True, False, True], 3)
    np.testing.assert_array_equal(coords, [[20.0, 10.0], [21.0, 11.0]])   # XY
    np.testing.assert_array_equal(labels, [1, 0])
    coords, labels = points_on_slice(np.array([[7.0, 9.0]]), [True], None)
    np.testing.assert_array_equal(coords, [[9.0, 7.0]])
    rect = np.array([[2, 10, 30], [2, 10, 50], [2, 40, 50], [2, 40, 30]], float)
    other = rect.copy()
    other[:, 0] = 5
    np.testing.assert_array_equal(box_on_slice([rect, other], 2), [30, 10, 50, 40])
    assert box_on_slice([rect], 3) is None
    assert box_on_slice([rect[:, 1:]], None, ["ellipse"]) is None
    with pytest.raises(ValueError, match="3 points but 2"):
        points_on_slice(data, [True, False], 3)
    labels3d = np.zeros((3, 8, 8), np.int32)
    labels3d[1, 2:4, 2:4] = 7
    assert object_mask(labels3d, 7, 1).sum() == 4
    with pytest.raises(ValueError, match="object 7 is not present in slice 0"):
        object_mask(labels3d, 7, 0)


def test_session_commit_undo_and_missing_embedding(volume_session):
    session, vol, ref = volume_session
    with pytest.raises(MissingEmbeddingError):
        session.predict(3, points=np.array([[30.0, 30.0]]), labels=np.array([1]))
    assert session.predict(3) is None                       # no prompt: nothing to do
    with pytest.raises(ValueError, match="nothing to commit"):
        session.commit()
    session.current[3, 10:20, 10:20] = 1
    assert session.commit() == 1
    session.current[3:5, 15:25, 15:25] = 1                  # overlaps object 1
    assert session.commit() == 2
    assert (session.committed == 1).sum() == 100            # object 1 untouched
    assert (session.committed == 2).sum() == 2 * 100 - 25
    assert not session.current.any()
    assert session.undo() == 2 and session.next_label() == 2
    assert session.undo() == 1 and not session.committed.any()
    assert session.undo() is None


def test_session_embeds_predicts_and_cancels(volume_session, tiny_model_256):
    session, vol, ref = volume_session
    token = CancelToken()
    steps = session.embedding_steps([2, 3, 4], token, batch=1)
    assert next(steps) == (0, 3)
    assert next(steps) == (1, 3)
    token.cancel()
    with pytest.raises(Cancelled):
        next(steps)
    assert session.has_embedding(2) and not session.has_embedding(3)
    assert list(session.embedding_steps([2, 3])) == [(0, 1), (1, 1)]   # 2 is reused
    ys, xs = np.nonzero(ref[3] == 5) if (ref[3] == 5).any() else np.nonzero(ref[3] == 4)
    pt = np.array([[xs.mean(), ys.mean()]])
    res = session.predict(3, points=pt, labels=np.array([1]))
    ref_pred = SegMoTEPredictor(tiny_model_256)
    ref_pred.set_image(vol[3], modality="CT")
    expected = ref_pred.predict(point_coords=pt, point_labels=np.array([1])).masks[0]
    np.testing.assert_array_equal(res.mask, expected)
    np.testing.assert_array_equal(session.current[3].astype(bool), expected)
    assert res.z == 3 and 0 <= res.confidence <= 1 and res.expert in range(4)
    assert session.routing_heatmap().shape == (4, 64, 64)
    assert not np.delete(session.current, 3, axis=0).any()


def test_session_2d_rgb(tiny_model_256):
    img, lesion = make_dermoscopy_phantom(size=64)
    session = AnnotationSession(img, SegMoTEPredictor(tiny_model_256), rgb=True)
    assert session.n_slices == 1 and session.shape == (64, 64)
    list(session.embedding_steps())
    res = session.predict(0, box=np.array([10, 10, 50, 50]))
    assert res.mask.shape == (64, 64) and session.current.shape == (64, 64)
    with pytest.raises(ValueError, match="2D or 3D"):
        AnnotationSession(np.zeros((2, 3, 8, 8)), session.predictor)
    with pytest.raises(ValueError, match="mask prompt of shape"):
        session.predict(0, mask=np.ones((8, 8), bool))


def test_sample_data_is_deterministic():
    a, la, spacing = make_ct_phantom()
    b, lb, _ = make_ct_phantom()
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int16 and a.shape == (24, 128, 128) and spacing == (2.5, 1.5, 1.5)
    assert set(np.unique(la)) == {0, *CT_CATEGORIES}
    kidney = [(la[z] == 5).any() for z in range(24)]
    assert kidney == [False] * 8 + [True] * 8 + [False] * 8   # the middle third only
    assert a[la == 5].mean() > 200 and a[la == 1].mean() < -700
    img, mask = make_dermoscopy_phantom()
    assert img.shape == (192, 192, 3) and img.dtype == np.uint8
    yy, xx = np.mgrid[:192, :192]
    field = np.hypot(yy - 95.5, xx - 95.5) < 0.6 * 96   # the bright disc of the dermatoscope
    assert img[mask == 1].mean() < img[field & (mask == 0)].mean() - 60
    assert img[:12, :12].mean() < 30 and img[field & (mask == 0)].mean() > 150  # the vignette


def test_store_keeps_memory_bounded_over_a_disk_cache(tmp_path):
    from segmote_core.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "c.zarr", {"model": "m"}, n_slices=6)
    store = EmbeddingStore(cache, max_in_memory=2)
    for z in range(6):
        store.put(z, {"image_embeddings": np.full((2, 4, 4), z, np.float32),
                      "original_size": (8, 8), "input_size": (16, 16)})
    assert len(store) == 2                                   # only the last two in memory
    assert store.get(0)["image_embeddings"][0, 0, 0] == 0    # read back from disk
    assert store.missing(range(7)) == [6]
    mem_only = EmbeddingStore()
    for z in range(6):
        mem_only.put(z, {"image_embeddings": np.zeros(1)})
    assert len(mem_only) == 6


def test_embeddings_are_batched_and_equal_the_predictors(volume_session, tiny_model_256):
    session, vol, _ = volume_session
    steps = list(session.embedding_steps([0, 1, 2, 3, 4, 5], batch=4))
    assert steps == [(0, 6), (4, 6), (6, 6)]                 # one step per encoder batch
    single = SegMoTEPredictor(tiny_model_256)
    for z in (0, 5):
        single.set_image(vol[z], modality="CT")
        ref, got = single.get_embedding(), session.store.get(z)
        np.testing.assert_allclose(got["image_embeddings"], ref["image_embeddings"], atol=1e-5)
        assert got["original_size"] == ref["original_size"] == (64, 64)
        assert got["input_size"] == ref["input_size"]


def test_disk_store_is_signed_as_the_cache_signs(tmp_path, tiny_model_256):
    from segmote_core.cache import EmbeddingCacheMismatchError, EmbeddingCache

    vol, _, _ = make_ct_phantom(shape=(8, 64, 64))
    pred = SegMoTEPredictor(tiny_model_256)
    store = EmbeddingStore.on_disk(tmp_path, pred, vol, 8, "CT", "soft_tissue")
    ref = EmbeddingCache.for_volume(tmp_path / "ref.zarr", pred, vol, modality="CT",
                                    window="soft_tissue")
    assert store.cache.signature == ref.signature
    with pytest.raises(EmbeddingCacheMismatchError, match="modality"):
        list(store.compute_steps(pred, lambda z: vol[z], [0], modality="MR",
                                 window="soft_tissue"))


def test_auto_steps_use_the_volume_path_and_the_store(volume_session, tiny_model_256):
    session, vol, _ = volume_session
    list(session.embedding_steps([2]))
    before = session.store.get(2)["image_embeddings"]
    list(session.auto_steps([2, 5]))
    ref = segment_volume_auto(tiny_model_256, vol, "CT", precision="fp32")
    for z in (2, 5):
        np.testing.assert_array_equal(session.current[z], ref.labels[z])
        res = session.auto_results[z]
        assert res.z == z and res.expert == ref.expert[z] and res.token == ref.token[z]
        assert res.score == pytest.approx(float(ref.score[z]), abs=1e-5)
        np.testing.assert_array_equal(res.mask, ref.labels[z].astype(bool))
    assert session.store.get(2)["image_embeddings"] is before   # reused, not recomputed
    assert 5 in session.store and 3 not in session.store        # computed once, kept
    assert not session.current[[0, 1, 3, 4, 6, 7]].any()


def test_auto_steps_on_a_2d_rgb_image(tiny_model_256):
    img, _ = make_dermoscopy_phantom(size=64)
    session = AnnotationSession(img, SegMoTEPredictor(tiny_model_256), rgb=True)
    assert list(session.auto_steps()) == [(1, 1)]
    ref = segment_volume_auto(tiny_model_256, img[None], precision="fp32")
    np.testing.assert_array_equal(session.current, ref.labels[0])
    assert set(session.auto_results) == {0} and 0 in session.store
