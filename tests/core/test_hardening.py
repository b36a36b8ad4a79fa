"""Model-side hardening: the router's straight-through term stays finite for any logits and its
gradient for k >= 2 is the documented one; the store lock's stale-lock logic."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from segmote_core.locking import StoreLock, StoreLockedError, lock_path
from segmote_core.modeling import MoTERouter
from segmote_core.modeling.mote import straight_through


# ------------------------------------------------------------ MoTE straight-through
def _underflowing_router(k: int = 2) -> tuple[MoTERouter, torch.Tensor]:
    """A router whose 2nd-best expert sits 200 below the best: its full-softmax probability
    is exactly 0 in float32 (underflow starts ~104 below), yet it is in the top 2."""
    torch.manual_seed(0)
    router = MoTERouter(dim=4, num_experts=4, top_k=k, rank=8).train()
    with torch.no_grad():
        router.w_gate.copy_(torch.tensor([[0.0, -200.0, -300.0, -400.0]]).repeat(4, 1) / 4)
    x = torch.ones(2, 3, 4, requires_grad=True)
    return router, x


def test_straight_through_is_finite_when_a_selected_probability_underflows():
    """With k = 2 the old ratio p / p.detach() was 0 / 0: NaN gates, outputs and gradients."""
    router, x = _underflowing_router(k=2)
    p = torch.softmax(x @ router.w_gate, dim=-1)
    assert (p[..., 1] == 0).all()                  # the selected 2nd expert did underflow
    out, routing = router(x)
    assert torch.isfinite(routing.gates).all() and torch.isfinite(out).all()
    assert routing.topk_indices.shape[-1] == 2 and (routing.topk_indices[..., 1] == 1).all()
    top = torch.softmax(routing.logits.topk(2, dim=-1).values, dim=-1)
    torch.testing.assert_close(routing.gates.topk(2, dim=-1).values, top)  # values: SPEC's
    (out.sum() + routing.balance_loss).backward()
    grads = [x.grad] + [p.grad for p in router.parameters() if p.grad is not None]
    assert router.w_gate.grad is not None
    assert all(torch.isfinite(g).all() for g in grads)


def test_straight_through_gradient_for_k_2_is_the_documented_one():
    """docs/model.md: gate_i = softmax_topk(h)_i * exp(log p_i - sg(log p_i)), so
    d gate_i = d softmax_topk(h)_i + gate_i * d log p_i (p the full softmax): the top-k
    softmax's own gradient plus each selected expert's log-probability gradient weighted by its
    gate (for k = 1 only the second term remains: the router's learning signal)."""
    torch.manual_seed(1)
    h = torch.randn(5, 6, requires_grad=True)
    v = torch.randn(5, 2)
    vals, idx = h.topk(2, dim=-1)
    logp = torch.log_softmax(h, dim=-1).gather(-1, idx)
    gates = torch.softmax(vals, dim=-1) * straight_through(logp)
    (gates * v).sum().backward()
    got = h.grad.clone()
    h.grad = None
    vals, idx = h.topk(2, dim=-1)
    soft = torch.softmax(vals, dim=-1)
    logp = torch.log_softmax(h, dim=-1).gather(-1, idx)
    ((soft * v).sum() + (soft.detach() * v * logp).sum()).backward()
    torch.testing.assert_close(got, h.grad)
    assert straight_through(torch.tensor([-1e30, 0.0, 3.0])).tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------ the store lock
def test_lock_names_a_live_holder_and_takes_a_stale_one(tmp_path, caplog):
    store = tmp_path / "s.zarr"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(store).write_text(json.dumps({"host": socket.gethostname(),
                                                "pid": sleeper.pid, "purpose": "segmote batch",
                                                "since": 0}))
        with pytest.raises(StoreLockedError, match=f"segmote batch \\(pid {sleeper.pid} on host"):
            StoreLock(store, "segmote ingest")
    finally:
        sleeper.kill()
        sleeper.wait()
    with StoreLock(store, "segmote ingest") as lock:      # its holder is gone: stale, taken
        assert lock.held and json.loads(lock_path(store).read_text())["pid"] == os.getpid()
    assert "stale lock of segmote batch" in caplog.text and "no longer runs" in caplog.text
    assert not lock_path(store).exists()


def test_lock_of_another_host_is_explained_not_taken(tmp_path):
    store = tmp_path / "s.zarr"
    lock_path(store).write_text(json.dumps({"host": "elsewhere", "pid": 1,
                                            "purpose": "segmote batch"}))
    with pytest.raises(StoreLockedError, match=r"cannot check: if no such process runs on "
                                               r"elsewhere, delete .*s\.zarr\.lock"):
        StoreLock(store, "segmote batch")
    lock_path(store).write_text("{garbage")
    with pytest.raises(StoreLockedError, match="unknown process"):
        StoreLock(store, "segmote batch")
    assert lock_path(store).exists()                       # never removed on a guess


# ------------------------------------------------------------ checkpoints
def _tiny(seed: int = 0):
    from segmote_core import SegMoTEConfig, build_segmote

    torch.manual_seed(seed)
    return build_segmote(SegMoTEConfig(model_type="tiny", image_size=128)).eval()


def _slices(n: int = 2, size: int = 48):
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.normal(0, 10, (n, size, size)).astype(np.float32)
    img[:, 12:36, 10:30] += 100
    return img


def test_a_checkpoint_with_one_nan_weight_is_refused_at_load(tmp_path):
    """It loaded and gave empty masks everywhere, exit 0."""
    from segmote_core import CheckpointError, load_segmote, save_segmote

    model = _tiny()
    with torch.no_grad():
        model.sam.mask_decoder.iou_prediction_head.layers[0].weight[0, 0] = float("nan")
    path = save_segmote(model, tmp_path / "nan.safetensors", training={"steps": 1})
    with pytest.raises(CheckpointError) as err:
        load_segmote(path)
    msg = str(err.value)
    assert str(path) in msg and "iou_prediction_head.layers.0.weight" in msg and "NaN" in msg


def test_non_finite_logits_at_run_time_fail_with_that_reason(tmp_path):
    from pipeline.worker import ModelSpec, SegmentWorker, SliceTask
    from segmote_core import save_segmote
    from segmote_core.inference import segment_batch

    model = _tiny()
    with torch.no_grad():
        model.sam.mask_decoder.output_upscaling[0].bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite mask logits"):
        segment_batch(model, _slices(), "CT", precision="fp32")
    ckpt = save_segmote(_tiny(), tmp_path / "t.safetensors", trained=("experts", "ppt"))
    worker = SegmentWorker(ModelSpec(str(ckpt), precision="fp32"), threads=1)
    with torch.no_grad():  # weights that overflow after loading (the load check saw them fine)
        worker.model.sam.mask_decoder.output_upscaling[0].bias.fill_(float("inf"))
    res = worker(SliceTask("c", 0, _slices(), "CT"))
    assert res.labels is None and "non-finite mask logits" in res.error


def test_every_size_field_of_a_checkpoint_config_is_bounded_before_building(tmp_path):
    """A checkpoint JSON with num_experts: 200000 allocated gigabytes before any check."""
    import json
    import time
    import tracemalloc

    from safetensors.torch import save_file

    from segmote_core import CheckpointError, SegMoTEConfig, load_segmote

    for field, value in (("num_experts", 200000), ("num_expert_tokens", 10 ** 6),
                         ("expert_rank", 10 ** 7), ("num_ppt_queries", 10 ** 6),
                         ("ppt_heads", 0), ("image_size", 2 ** 20), ("top_k", 99)):
        with pytest.raises(ValueError, match=field):
            SegMoTEConfig(model_type="tiny", **{field: value})
    config = SegMoTEConfig(model_type="tiny").to_dict()
    config["num_experts"] = 200000
    info = {"format": "segmote", "format_version": 1, "config": config,
            "base": {"kind": "embedded", "model_type": "tiny"}, "training": {}}
    path = tmp_path / "huge.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"segmote": json.dumps(info)})
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"huge\.safetensors.*num_experts"):
        load_segmote(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 50 * 2 ** 20


def test_malformed_checkpoint_json_is_named(tmp_path):
    from safetensors.torch import save_file

    from segmote_core import CheckpointError, load_segmote

    for i, meta in enumerate(("{not json", '{"format": "segmote"}', '["a list"]',
                              '{"format": "segmote", "config": {"model_type": 7}}')):
        path = tmp_path / f"bad{i}.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata={"segmote": meta})
        with pytest.raises(CheckpointError, match=f"bad{i}\\.safetensors"):
            load_segmote(path)


# ------------------------------------------------------------ which parts are trained
def test_a_model_knows_which_parts_were_trained(tmp_path):
    """Official SAM weights with no SegMoTE weights ran PPT auto with random queries: an X-ray
    came back 'done', half labelled. Now auto refuses an untrained model, saying what to do,
    and prompted paths of an untrained model give SAM's own mask."""
    from segmote_core import load_segmote, save_segmote
    from segmote_core.inference import segment_batch
    from segmote_core.trained import UntrainedModelError, auto_unavailable, trained_parts

    model = _tiny()
    trained = load_segmote(save_segmote(model, tmp_path / "t.safetensors",
                                        training={"steps": 10}))
    assert trained_parts(trained) == {"experts", "ppt"} and auto_unavailable(trained) is None
    assert segment_batch(trained, _slices(), "CT", precision="fp32").masks.shape == (2, 48, 48)
    raw = load_segmote(save_segmote(model, tmp_path / "u.safetensors"))  # saved untrained
    assert trained_parts(raw) == set()
    reason = auto_unavailable(raw)
    assert "--mode box" in reason and "docs/training.md" in reason
    with pytest.raises(UntrainedModelError, match="--mode box"):
        segment_batch(raw, _slices(), "CT", precision="fp32")
    import numpy as np

    boxes = np.array([[10, 12, 30, 36]] * 2, np.float32)
    got = segment_batch(raw, _slices(), "CT", boxes=boxes, precision="fp32")
    assert np.isnan(got.confidence).all() and (got.expert == -1).all()  # SAM's mask, no expert
    feats = raw.encode(torch.zeros(1, 3, 128, 128))
    out = raw.decode(feats, boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0]]))
    torch.testing.assert_close(out.low_res_masks, out.sam_masks[:, :1])


def test_bare_sam_is_stock_sam_and_refuses_auto(tmp_path):
    from segmote_core import SegMoTEConfig
    from segmote_core.build import build_sam, load_model
    from segmote_core.inference import segment_batch
    from segmote_core.trained import UntrainedModelError, trained_parts

    torch.manual_seed(0)
    sam = build_sam(SegMoTEConfig(model_type="tiny"))
    torch.save(sam.state_dict(), tmp_path / "sam_tiny.pth")
    model = load_model(sam_checkpoint=tmp_path / "sam_tiny.pth", model_type="tiny")
    assert trained_parts(model) == set() and model.ppt is None
    with pytest.raises(UntrainedModelError, match="bare SAM"):
        segment_batch(model, _slices(), "XR", precision="fp32")
    feats = model.encode(torch.zeros(1, 3, 256, 256))
    box = torch.tensor([[10.0, 12.0, 120.0, 140.0]])
    out = model.decode(feats, boxes=box)
    sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
    low, _ = sam.mask_decoder(feats.image_embeddings, sam.prompt_encoder.get_dense_pe(), sparse,
                              dense, multimask_output=False)
    torch.testing.assert_close(out.low_res_masks, low, atol=1e-4, rtol=1e-4)


def test_a_forked_child_never_releases_its_parents_lock(tmp_path):
    store = tmp_path / "s.zarr"
    with StoreLock(store, "segmote batch") as lock:
        pid = os.fork()
        if pid == 0:  # the child drops its copy of the lock object, then exits
            lock.release()
            del lock
            os._exit(0)
        os.waitpid(pid, 0)
        assert lock_path(store).exists() and json.loads(
            lock_path(store).read_text())["pid"] == os.getpid()
    assert not lock_path(store).exists()


def test_lock_creates_the_stores_folder_as_the_store_would(tmp_path):
    with StoreLock(tmp_path / "new" / "deeper" / "c.zarr", "segmote ingest") as lock:
        assert lock.path == tmp_path / "new" / "deeper" / "c.zarr.lock" and lock.path.exists()


_KILLED_TAKING_LOCK = """
import os, signal, sys
from segmote_core import locking
locking.os.write = lambda fd, data: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write
locking.StoreLock(sys.argv[1], "segmote review")
"""


def test_a_writer_killed_while_taking_the_lock_leaves_no_lock_behind(tmp_path):
    """The lock file appears whole or not at all: a writer SIGKILLed while writing its record
    (the CI's killed-save test once caught that window) must not leave an empty lock that
    every later writer refuses as 'an unknown process'."""
    store = tmp_path / "s.zarr"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _KILLED_TAKING_LOCK, str(store)], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not lock_path(store).exists()
    with StoreLock(store, "segmote batch") as lock:   # the next writer takes it at once
        assert json.loads(lock_path(store).read_text())["token"] == lock.token
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # nor any half-written file


def test_the_lock_file_is_never_seen_empty(tmp_path):
    """A second writer polling the lock while the first takes and drops it again and again
    sees it absent or whole, never empty (which it would have to refuse as unreadable)."""
    store = tmp_path / "s.zarr"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    taker = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom segmote_core.locking import StoreLock\n"
         "for _ in range(400):\n    StoreLock(sys.argv[1], 'x').release()\n", str(store)],
        env=env)
    from segmote_core.locking import read_lock
    seen = {"absent": 0, "whole": 0, "empty": 0}
    while taker.poll() is None:
        got = read_lock(lock_path(store))
        seen["absent" if got is None else "whole" if got else "empty"] += 1
    assert taker.returncode == 0
    assert seen["empty"] == 0, seen
