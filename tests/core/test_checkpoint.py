"""Acceptance 2.4-2.5: checkpoints, official-format SAM .pth, 512-px position tables."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmote_core import CheckpointError, SegMoTEConfig, build_segmote, load_segmote, save_segmote
from segmote_core.build import build_sam
from segmote_core.checkpoint import read_checkpoint_info
from segmote_core.param_report import report_lines


def _outputs(model, seed=0):
    torch.manual_seed(seed)
    s = model.image_size
    with torch.no_grad():
        feats = model.encode(model.preprocess(torch.rand(2, 3, s, s) * 255))
        out = model.decode(feats, boxes=torch.tensor([[10.0, 20, 120, 140], [30, 30, 200, 180]]))
        auto = model.decode(feats, auto=True)
    return torch.cat([out.low_res_masks, auto.low_res_masks]).numpy()


def test_round_trip_in_a_fresh_process(tmp_path, tiny_model_256):
    with torch.no_grad():  # make the additions non-trivial
        for p in tiny_model_256.expert_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_segmote(tiny_model_256, tmp_path / "m.safetensors", training={"steps": 3})
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["config"]["model_type"] == "tiny" and info["base"]["kind"] == "embedded"
    assert info["training"] == {"steps": 3} and "torch" in info["versions"]
    expected = _outputs(tiny_model_256)
    script = textwrap.dedent(f"""
        import numpy as np, torch, sys
        torch.set_num_threads({torch.get_num_threads()})  # same reduction order: bit-equal outputs
        sys.path.insert(0, {str(tmp_path)!r})
        from segmote_core import load_segmote
        from test_helper import _outputs
        m = load_segmote({str(path)!r})
        np.save({str(tmp_path / 'out.npy')!r}, _outputs(m))
    """)
    (tmp_path / "test_helper.py").write_text(
        "import torch\n" + textwrap.dedent(__import__("inspect").getsource(_outputs)))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_wrong_and_truncated_files_give_clear_errors(tmp_path, tiny_model_256):
    path = save_segmote(tiny_model_256, tmp_path / "m.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_segmote(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_segmote(junk)
    with pytest.raises(CheckpointError, match="no such"):
        load_segmote(tmp_path / "absent.safetensors")
    # a checkpoint of another configuration names the keys that do not fit
    other = build_segmote(SegMoTEConfig(model_type="tiny", num_expert_tokens=0))
    p2 = save_segmote(other, tmp_path / "other.safetensors")
    info = read_checkpoint_info(p2)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(p2))
    tensors["expert_decoder.bogus"] = torch.zeros(1)
    del tensors["sam.mask_decoder.iou_token.weight"]
    save_file(tensors, str(tmp_path / "keys.safetensors"), metadata={"segmote": json.dumps(info)})
    with pytest.raises(CheckpointError, match="expert_decoder.bogus") as err:
        load_segmote(tmp_path / "keys.safetensors")
    assert "sam.mask_decoder.iou_token.weight" in str(err.value)


@pytest.fixture(scope="module")
def vit_b_pth(tmp_path_factory):
    """An official-format SAM ViT-B checkpoint (plain state dict .pth) from random weights."""
    torch.manual_seed(5)
    sam = build_sam(SegMoTEConfig(model_type="vit_b"))
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def test_sam_pth_loads_through_the_real_weights_path(vit_b_pth, tmp_path):
    path, state = vit_b_pth
    model = build_segmote(SegMoTEConfig(model_type="vit_b"), sam_checkpoint=path)
    for k in ("image_encoder.pos_embed", "mask_decoder.iou_token.weight",
              "image_encoder.blocks.2.attn.rel_pos_h"):
        assert torch.equal(model.sam.state_dict()[k], state[k])
    # SegMoTE weights saved on top of it need the SAM base to load
    saved = save_segmote(model, tmp_path / "vitb.safetensors")
    assert read_checkpoint_info(saved)["base"]["kind"] == "sam_checkpoint"
    assert saved.stat().st_size < 20e6  # only the additions
    base = read_checkpoint_info(saved)["base"]
    assert base["file"] == path.name and base["path"] == str(path.resolve())
    again = load_segmote(saved)  # the SAM checkpoint is found where the record says
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        build_segmote(SegMoTEConfig(model_type="vit_b"), sam_checkpoint=trunc)


def test_512_input_interpolates_position_tables(vit_b_pth):
    path, state = vit_b_pth
    model = build_segmote(SegMoTEConfig(model_type="vit_b", image_size=512), sam_checkpoint=path)
    enc = model.sam.image_encoder
    assert enc.pos_embed.shape == (1, 32, 32, 768)
    want = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(32, 32),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(enc.pos_embed.data, want)
    g = enc.blocks[2].attn.rel_pos_h  # global attention block: 2*32-1 rows
    assert g.shape == (63, 64)
    ref = F.interpolate(state["image_encoder.blocks.2.attn.rel_pos_h"].t()[None], size=63,
                        mode="linear", align_corners=False)[0].t()
    torch.testing.assert_close(g.data, ref)
    w = enc.blocks[0].attn.rel_pos_h  # windowed block keeps its 2*14-1 table
    assert torch.equal(w.data, state["image_encoder.blocks.0.attn.rel_pos_h"])
    with torch.no_grad():
        feats = model.encode(model.preprocess(torch.rand(1, 3, 512, 512) * 255))
    assert feats.image_embeddings.shape == (1, 256, 32, 32)
    assert feats.interm_embeddings.shape == (1, 32, 32, 768)


def test_parameter_report_counts():
    lines = report_lines("vit_b", (1024, 512))
    text = "\n".join(lines)
    assert "vit_b @ 1024" in text and "vit_b @ 512" in text and "paper" in text
    row768 = next(line for line in lines if line.startswith("same modules"))
    total768 = float(row768.split()[-1].rstrip("M"))
    assert 14.0 < total768 < 20.0  # the paper's 17 M at 768 wide
    r1024 = next(line for line in lines if line.startswith("vit_b @ 1024")).split()
    r512 = next(line for line in lines if line.startswith("vit_b @ 512")).split()
    assert r1024[4:9] == r512[4:9]  # trainable counts do not depend on input size
