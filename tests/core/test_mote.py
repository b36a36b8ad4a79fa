"""MoTE against a reference written from the router equations of docs/model.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segmote_core.modeling import ImageFeatures, MoTERouter
from segmote_core.modeling.transformer import _block_forward

C, E, T, R = 32, 4, 4, 16


def cv2_ref(x):
    x = x.flatten().double()
    return torch.zeros((), dtype=torch.float64) if x.numel() == 1 else x.var() / (x.mean() ** 2 + 1e-10)


def reference(x, w_g, w_noise, k, training, eps, experts, mix1, mix2, proj):
    """Router steps 1-7 of docs/model.md, written out plainly (loops, no code shared with the
    router)."""
    h = x @ w_g
    if training:
        h = h + eps * (F.softplus(x @ w_noise) + 1e-2)
    b, t, e = h.shape
    g = torch.zeros_like(h)
    for i in range(b):
        for j in range(t):
            vals, idx = torch.sort(h[i, j], descending=True)
            soft = torch.softmax(vals[:k], dim=0)
            for r in range(k):
                g[i, j, idx[r]] = soft[r]
    c = h.max(dim=-1).values
    t_star = c.argmax(dim=1)
    e_star = torch.stack([h[i, t_star[i]].argmax() for i in range(b)])
    importance = g.sum(0)
    load = g.sum((0, 1)) if training else (g > 0).sum((0, 1)).float()
    l_bal = cv2_ref(importance) + cv2_ref(load)
    upd = torch.zeros(b, t, experts[0].out_features)
    for i in range(b):
        for j in range(t):
            for q in range(e):
                if g[i, j, q] > 0:
                    upd[i, j] += g[i, j, q] * experts[q](x[i, j])
    new = proj(mix2(mix1(upd)))
    return dict(h=h, g=g, c=c, t_star=t_star, e_star=e_star, l_bal=l_bal, new=new)


def _router(k, seed=0):
    torch.manual_seed(seed)
    r = MoTERouter(dim=C, num_experts=E, top_k=k, rank=R)
    with torch.no_grad():  # non-zero gates so routing is not a tie
        r.w_gate.normal_()
        r.w_noise.normal_()
    return r


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_router_matches_spec_reference(k, training):
    r = _router(k).train(training)
    x = torch.randn(5, T, C)
    torch.manual_seed(42)
    new, routing = r(x)
    torch.manual_seed(42)
    eps = torch.randn(5, T, E)
    ref = reference(x, r.w_gate, r.w_noise, k, training, eps, r.experts, r.mix1, r.mix2, r.proj)
    torch.testing.assert_close(routing.logits, ref["h"])
    torch.testing.assert_close(routing.gates, ref["g"])
    torch.testing.assert_close(routing.token_confidence, ref["c"])
    assert torch.equal(routing.selected_token, ref["t_star"])
    assert torch.equal(routing.selected_expert, ref["e_star"])
    assert abs(routing.balance_loss.item() - ref["l_bal"].item()) < 1e-4
    torch.testing.assert_close(new, ref["new"], atol=1e-5, rtol=1e-4)
    # gates sum to 1 over exactly k experts
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(5, T))
    assert ((routing.gates > 0).sum(-1) == k).all()
    # the token weights are softmax_t of the confidences
    torch.testing.assert_close(routing.token_weights, torch.softmax(ref["c"], dim=1))


def test_noise_only_in_training():
    r = _router(1)
    x = torch.randn(3, T, C)
    r.eval()
    a, b = r.route(x).logits, r.route(x).logits
    assert torch.equal(a, b) and torch.equal(a, x @ r.w_gate)
    r.train()
    n1, n2 = r.route(x).logits, r.route(x).logits
    assert not torch.allclose(n1, x @ r.w_gate) and not torch.allclose(n1, n2)


def _onehot_tokens(assign):
    """Tokens whose logits are one-hot on the experts in ``assign`` (B, T) (W_g = [I; 0])."""
    b, t = assign.shape
    x = torch.zeros(b, t, C)
    for i in range(b):
        for j in range(t):
            x[i, j, assign[i, j]] = 1.0 + 0.1 * j  # token j's confidence grows with j
    r = MoTERouter(dim=C, num_experts=E, top_k=1, rank=R).eval()
    with torch.no_grad():
        r.w_gate.zero_()
        r.w_gate[:E] = torch.eye(E)
    return r, x


def test_balance_loss_zero_when_balanced_and_grows_with_collapse():
    losses = []
    for collapsed in range(0, 5):  # how many of the 4 images route every token to expert 0
        assign = torch.tensor([[(j + i) % E for j in range(T)] for i in range(4)])
        assign[:collapsed] = 0
        r, x = _onehot_tokens(assign)
        losses.append(r.route(x).balance_loss.item())
    assert losses[0] == pytest.approx(0.0, abs=1e-9)
    assert all(b > a for a, b in zip(losses, losses[1:])), losses


def test_images_of_one_batch_select_different_tokens_and_experts():
    assign = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    r, x = _onehot_tokens(assign)
    x[1, 0] *= 10  # image 1: token 0 is the most confident
    routing = r.route(x)
    assert routing.selected_token.tolist() == [3, 0]
    assert routing.selected_expert.tolist() == [3, 3]
    x[1, 0] = 0
    x[1, 0, 1] = 10.0
    routing = r.route(x)
    assert routing.selected_token.tolist() == [3, 0] and routing.selected_expert.tolist() == [3, 1]


def test_update_replaces_expert_tokens_inside_the_block(tiny_model_256):
    """After a block, the expert tokens are exactly the router's output (no residual)."""
    model = tiny_model_256.eval()
    block = model.sam.mask_decoder.transformer.layers[1]
    router = model.expert_decoder.routers[1]
    n_tok, s = 9 + 4 + 2, model.config.embedding_size
    q = torch.randn(2, n_tok, 128)
    keys = torch.randn(2, s * s, 128)
    qpe, kpe = torch.randn_like(q), torch.randn_like(keys)
    sl = slice(5, 9)
    captured = {}
    handle = router.register_forward_hook(lambda m, i, o: captured.update(out=o[0]))
    with torch.no_grad():
        out_q, _, routing, _ = _block_forward(block, router, q, keys, qpe, kpe, sl, False)
    handle.remove()
    assert torch.equal(out_q[:, sl], captured["out"])
    # the other tokens went through SAM's MLP + norm3, not through the router
    assert not torch.allclose(out_q[:, :5], q[:, :5])


def test_balance_loss_sums_both_blocks(tiny_model_256):
    model = tiny_model_256.eval()
    s = model.config.embedding_size
    feats = ImageFeatures(torch.randn(3, 128, s, s), torch.randn(3, s, s, 192))
    out = model.decode(feats, boxes=torch.tensor([[10.0, 10, 100, 100]] * 3))
    assert len(out.routings) == 2
    expected = out.routings[0].balance_loss + out.routings[1].balance_loss
    assert out.balance_loss.item() == pytest.approx(expected.item())
    # only the last block's selected token predicts
    assert torch.equal(out.selected_token, out.routings[-1].selected_token)


def test_expert_mask_is_selected_token_dot_fused_features(tiny_model_256):
    """docs/model.md: the selected token's own hypernetwork . (fusion(upscaled) + HQ features)."""
    from segmote_core.modeling.transformer import run_two_way_transformer

    m = tiny_model_256.eval()
    torch.manual_seed(3)
    f = ImageFeatures(torch.randn(3, 128, 32, 32), torch.randn(3, 32, 32, 192))
    boxes = torch.tensor([[10.0, 10, 100, 100], [20, 30, 200, 220], [0, 0, 255, 255]])
    d, pe, dec = m.expert_decoder, m.sam.prompt_encoder, m.sam.mask_decoder
    with torch.no_grad():
        out = m.decode(f, boxes=boxes)
        sparse, dense = pe(points=None, boxes=boxes, masks=None)
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, d.expert_tokens.weight])
        tokens = torch.cat([tokens.unsqueeze(0).expand(3, -1, -1), sparse], 1)
        r = run_two_way_transformer(dec.transformer, d.routers, f.image_embeddings + dense,
                                    pe.get_dense_pe().repeat(3, 1, 1, 1), tokens, slice(5, 9))
        up = dec.output_upscaling(r.keys.transpose(1, 2).reshape(3, 128, 32, 32))
        fused = (d.feature_fusion(up) + d.embedding_encoder(f.image_embeddings)
                 + d.compress_vit_feat(f.interm_embeddings.permute(0, 3, 1, 2)))
        t = r.routings[-1].selected_token
        hyper = torch.stack([d.expert_hypernetworks[int(t[i])](r.queries[i, 5 + int(t[i])])
                             for i in range(3)])
        ref = torch.einsum("nc,nchw->nhw", hyper, fused)
    torch.testing.assert_close(out.expert_masks[:, 0], ref, atol=1e-5, rtol=1e-5)


def test_conv_to_one_channel_equals_conv2d():
    import torch.nn.functional as F

    from segmote_core.modeling.fast_ops import conv_to_one_channel

    torch.manual_seed(0)
    x = torch.randn(3, 16, 20, 17).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 16, 3, 3)
    ref = torch.stack([F.conv2d(x[i:i + 1], w[i:i + 1], padding=1)[0, 0] for i in range(3)])
    torch.testing.assert_close(conv_to_one_channel(x, w), ref, atol=1e-4, rtol=1e-5)
