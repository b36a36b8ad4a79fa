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
