"""Acceptance 2.3: a training step changes only the additions (and the decoder when asked)."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig, build_segmote


def _dice_loss(logits, target):
    p = torch.sigmoid(logits)
    inter = (p * target).sum((-1, -2))
    return (1 - (2 * inter + 1) / (p.sum((-1, -2)) + target.sum((-1, -2)) + 1)).mean()


def _step(model, seed=0):
    torch.manual_seed(seed)
    model.train()
    s = model.image_size
    images = model.preprocess(torch.rand(4, 3, s, s) * 255)
    with torch.no_grad():
        feats = model.encode(images)
    boxes = torch.tensor([[20.0, 30, 150, 160], [40, 40, 200, 220], [10, 10, 90, 100],
                          [60, 50, 240, 250]])
    out = model.decode(feats, boxes=boxes)
    target = torch.zeros_like(out.low_res_masks)
    target[..., 10:60, 10:70] = 1
    loss = _dice_loss(out.low_res_masks, target) + 0.01 * out.balance_loss
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    loss.backward()
    grads = {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
             for n, p in model.named_parameters()}
    opt.step()
    return out, grads


@pytest.mark.parametrize("train_decoder", [False, True])
def test_step_changes_only_added_parameters(train_decoder):
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", train_decoder=train_decoder))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, grads = _step(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for k in changed:
        allowed = not k.startswith("sam.") or (train_decoder and k.startswith("sam.mask_decoder."))
        assert allowed, f"{k} changed but is frozen"
    assert not any(k.startswith(("sam.image_encoder.", "sam.prompt_encoder.")) for k in changed)
    assert any(k.startswith("sam.mask_decoder.") for k in changed) == train_decoder
    assert any(k.startswith("expert_decoder.routers.") for k in changed)
    assert any(k.startswith("expert_decoder.expert_hypernetworks.") for k in changed)
    assert any(k.startswith("expert_decoder.compress_vit_feat.") for k in changed)


def test_gradients_reach_every_routed_expert():
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny"))
    out, grads = _step(model, seed=1)
    for b, routing in enumerate(out.routings):
        routed = (routing.gates > 0).any(dim=(0, 1))
        for e, was_routed in enumerate(routed.tolist()):
            g = grads[f"expert_decoder.routers.{b}.experts.{e}.weight"]
            if was_routed:
                assert g > 0, f"block {b} expert {e} was routed to but got no gradient"
            else:
                assert g == 0, f"block {b} expert {e} got gradient without routing"
        # the router's gate learns too (straight-through routing gradient)
        assert grads[f"expert_decoder.routers.{b}.w_gate"] > 0


def test_ppt_parameters_train_in_auto_mode():
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", vocabulary=("brain",))).train()
    s = model.image_size
    with torch.no_grad():
        feats = model.encode(model.preprocess(torch.rand(2, 3, s, s) * 255))
    out = model.decode(feats, auto=True, text_ids=torch.tensor([0, 0]))
    out.low_res_masks.sigmoid().mean().backward()
    assert model.ppt.query.grad.abs().sum() > 0
    assert model.text_encoder.table.weight.grad.abs().sum() > 0
    assert model.sam.prompt_encoder.no_mask_embed.weight.grad is None
