"""Checkpoints written before the decoder module was renamed (decoder_ext -> expert_decoder)
keep loading, with every tensor in place."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, safe_open, save_file

from segmote_core import SegMoTEConfig, build_segmote, load_segmote, save_segmote
from segmote_core.build import load_demo_model


def test_old_key_names_load(tmp_path):
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=128))
    with torch.no_grad():
        for p in model.expert_decoder.parameters():
            p.add_(torch.randn_like(p))
    path = save_segmote(model, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    old = {k.replace("expert_decoder.", "decoder_ext.", 1): v for k, v in load_file(str(path)).items()}
    assert any(k.startswith("decoder_ext.") for k in old)
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    again = load_segmote(tmp_path / "old.safetensors")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_bundled_demo_model_loads():
    model = load_demo_model()
    assert model.expert_decoder.num_expert_tokens == model.config.num_expert_tokens


def test_both_bundled_demo_models_load_and_the_default_sits_on_litemedsam():
    from segmote_core.build import DEMO_BASE, demo_model_path
    from segmote_core.checkpoint import read_checkpoint_info

    assert DEMO_BASE == "lite_medsam" and demo_model_path() == demo_model_path("lite_medsam")
    assert read_checkpoint_info(demo_model_path())["base"]["name"] == "LiteMedSAM"
    for base, model_type in (("lite_medsam", "lite_medsam"), ("tiny", "tiny")):
        model = load_demo_model(base=base)
        assert model.config.model_type == model_type and model.ppt is not None
        assert {"brain", "grey_matter", "white_matter", "kidney"} <= set(model.config.vocabulary)
