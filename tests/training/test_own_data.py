"""Training on one's own data with an official-style SAM checkpoint, without traps: a vit_* model
does not silently train on a random encoder, SegMoTE weights remember (and check) the SAM file
they sit on, and the embedding pre-compute resumes where an interrupt stopped it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from segmote_core.build import build_sam, build_segmote, load_segmote, resolve_sam_checkpoint
from segmote_core.checkpoint import CheckpointError, read_checkpoint_info, save_segmote
from segmote_core.cli import main as segmote_main
from segmote_core.config import SegMoTEConfig
from segmote_core.progress import CancelToken, Cancelled
from training.dataset import build_slice_dataset
from training.precompute import load_or_compute_features, parts_dir
from training.train_config import OptimConfig, TrainConfig, load_train_config
from training.trainer import Trainer

from tests.io.volumes import EncoderCalls

TINY = SegMoTEConfig(model_type="tiny", image_size=64)


def save_sam_pth(path: Path, seed: int) -> Path:
    """A SAM checkpoint in the official format (a plain state dict .pth), random weights."""
    torch.manual_seed(seed)
    torch.save(build_sam(TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def two_sams(tmp_path_factory):
    d = tmp_path_factory.mktemp("sams")
    return save_sam_pth(d / "sam_tiny_a.pth", 1), save_sam_pth(d / "sam_tiny_b.pth", 2)


# ------------------------------------------------------------------ random encoder refused
def test_vit_config_without_sam_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="needs sam_checkpoint.*--random-encoder"):
        TrainConfig(model=SegMoTEConfig(model_type="vit_b"))
    assert TrainConfig(model=SegMoTEConfig(model_type="vit_b"), random_encoder=True)
    assert TrainConfig(model=SegMoTEConfig(model_type="vit_b"), init_checkpoint="x.safetensors")
    cfg = tmp_path / "vit.yaml"
    cfg.write_text("model: {model_type: vit_b}\ndata: {cohort: nowhere.zarr}\n")
    rc = segmote_main(["train", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    # one clear line, no traceback, before any model is built
    assert rc == 2 and len(err) == 1 and err[0].startswith("segmote train: error: ")
    assert "needs sam_checkpoint" in err[0] and "--random-encoder" in err[0]
    assert load_train_config(cfg, {"random_encoder": True}).random_encoder
    rc = segmote_main(["train", str(cfg), "--random-encoder"])   # past the check: the cohort
    err = capsys.readouterr().err
    assert rc == 2 and "data.cohort" in err and "nowhere.zarr" in err


# ------------------------------------------------------------------ provenance checked
def test_checkpoint_records_its_sam_and_refuses_another(two_sams, tmp_path):
    a, b = two_sams
    model = build_segmote(TINY, sam_checkpoint=a)
    saved = save_segmote(model, tmp_path / "m.safetensors", include_base=False)
    base = read_checkpoint_info(saved)["base"]
    import hashlib
    sha_a = hashlib.sha256(a.read_bytes()).hexdigest()
    sha_b = hashlib.sha256(b.read_bytes()).hexdigest()
    assert base == {"kind": "sam_checkpoint", "model_type": "tiny", "name": "SAM",
                    "file": "sam_tiny_a.pth", "path": str(a.resolve()), "sha256": sha_a}

    with pytest.raises(CheckpointError) as err:
        load_segmote(saved, sam_checkpoint=b)
    msg = str(err.value)
    assert sha_a in msg and sha_b in msg and "sam_tiny_a.pth" in msg and "sam_tiny_b.pth" in msg
    other = load_segmote(saved, sam_checkpoint=b, allow_other_base=True)   # the knowing user
    assert torch.equal(other.sam.image_encoder.pos_embed,
                       torch.load(b, weights_only=True)["image_encoder.pos_embed"])

    same = load_segmote(saved)                      # found where the record says
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in same.state_dict().items())

    moved = tmp_path / "elsewhere.pth"
    shutil.move(a, moved)
    try:
        with pytest.raises(CheckpointError, match=f"sam_tiny_a.pth, sha256 {sha_a}"):
            load_segmote(saved)
        assert resolve_sam_checkpoint(saved, moved) == moved   # same bytes, new place: fine
    finally:
        shutil.move(moved, a)


def test_random_encoder_is_recorded_as_such_and_embedded(tmp_path):
    model = build_segmote(TINY)
    saved = save_segmote(model, tmp_path / "r.safetensors")
    base = read_checkpoint_info(saved)["base"]
    assert base["kind"] == "embedded" and base["random_encoder"] is True
    assert base["name"] == "random encoder"


def test_training_records_the_sam_and_a_resume_on_another_is_refused(two_sams, tiny_cohort,
                                                                      tmp_path):
    a, b = two_sams
    ds = build_slice_dataset(tiny_cohort, image_size=64, split=None, max_slices_per_case=2)
    cfg = TrainConfig(model=TINY, sam_checkpoint=str(a), output_dir=str(tmp_path / "run"),
                      optim=OptimConfig(epochs=1, steps_per_epoch=3, batch_size=2),
                      num_threads=2)
    res = Trainer(cfg, dataset=ds).fit(max_steps=2, show_progress=False)
    assert res.model_path is None
    with pytest.raises(CheckpointError, match="sam_tiny_a.pth.*sam_tiny_b.pth"):
        Trainer(cfg.replace(sam_checkpoint=str(b)), dataset=ds)
    res = Trainer(cfg, dataset=ds).fit(show_progress=False)
    base = read_checkpoint_info(res.model_path)["base"]
    assert base["kind"] == "sam_checkpoint" and base["file"] == "sam_tiny_a.pth"
    assert res.model_path.stat().st_size < a.stat().st_size   # SAM is not copied in


# ------------------------------------------------------------------ resumable pre-compute
def test_interrupted_precompute_resumes_and_computes_only_the_rest(tiny_cohort, tmp_path):
    torch.manual_seed(0)
    model = build_segmote(TINY).eval()
    ds = build_slice_dataset(tiny_cohort, image_size=64, split=None)
    n = ds.num_slices
    assert n >= 12
    path = tmp_path / "emb.safetensors"
    cancel = CancelToken()
    seen: list[tuple[int, int]] = []

    def stop_after_two_chunks(done: int, total: int) -> None:
        seen.append((done, total))
        if done >= 8:
            cancel.cancel()
    calls = EncoderCalls(model)
    with pytest.raises(Cancelled):
        load_or_compute_features(model, ds.images, ds.extents, path, batch_size=2,
                                 chunk_size=4, progress=stop_after_two_chunks, cancel=cancel)
    assert calls.images == 8 and not path.exists()
    assert len(list(parts_dir(path).glob("chunk_*.safetensors"))) == 2
    assert seen[0] == (0, n) and seen[-1] == (8, n)

    calls.images = 0
    resumed_progress: list[int] = []
    cache = load_or_compute_features(model, ds.images, ds.extents, path, batch_size=2,
                                     chunk_size=4, progress=lambda d, t: resumed_progress.append(d))
    assert calls.images == n - 8                   # only the rest
    assert resumed_progress[0] == 8 and resumed_progress[-1] == n
    assert path.is_file() and not parts_dir(path).exists()

    calls.images = 0
    fresh = load_or_compute_features(model, ds.images, ds.extents, None, batch_size=2)
    assert calls.images == n
    assert torch.equal(cache.image_embeddings, fresh.image_embeddings)
    calls.close()


def test_interrupt_during_precompute_says_what_was_kept(tiny_cohort, tmp_path, monkeypatch):
    monkeypatch.setattr("training.precompute.CHUNK_SIZE", 8)
    ds = build_slice_dataset(tiny_cohort, image_size=64, split=None)
    cfg = TrainConfig(model=TINY, output_dir=str(tmp_path / "run"), num_threads=2,
                      optim=OptimConfig(epochs=1, steps_per_epoch=2, batch_size=2))
    trainer = Trainer(cfg, dataset=ds)
    cancel = CancelToken()
    with pytest.raises(Cancelled):
        trainer.prepare_cache(progress=lambda d, t: cancel.cancel() if d >= 8 else None,
                              cancel=cancel)
    hint = trainer.resume_hint()
    assert hint.startswith(f"8 of {ds.num_slices} slices of the embedding pre-compute")
    assert str(parts_dir(trainer.cache_file)) in hint and "rerun the same command" in hint
    assert not trainer.ckpt_dir.exists()   # the old message named this missing folder


def test_cache_with_intermediate_features_serves_a_model_without_expert_tokens(tiny_cohort,
                                                                              tmp_path):
    torch.manual_seed(0)
    with_experts = build_segmote(TINY).eval()
    without = build_segmote(SegMoTEConfig(model_type="tiny", image_size=64,
                                          num_expert_tokens=0)).eval()
    without.sam.load_state_dict(with_experts.sam.state_dict())   # the same frozen encoder
    assert with_experts.needs_interm and not without.needs_interm
    ds = build_slice_dataset(tiny_cohort, image_size=64, split=None)
    path = tmp_path / "emb.safetensors"
    shared = load_or_compute_features(with_experts, ds.images, ds.extents, path, batch_size=4)
    assert shared.interm_embeddings is not None
    before = path.read_bytes()

    calls = EncoderCalls(without)
    served = load_or_compute_features(without, ds.images, ds.extents, path, batch_size=4)
    assert calls.images == 0                           # nothing recomputed
    assert served.interm_embeddings is None
    assert torch.equal(served.image_embeddings, shared.image_embeddings)
    assert path.read_bytes() == before                 # the shared file is left as it was
    calls.close()

    # the other way round is a mismatch: a cache without them cannot serve the expert tokens
    own = tmp_path / "plain.safetensors"
    load_or_compute_features(without, ds.images, ds.extents, own, batch_size=4)
    calls = EncoderCalls(with_experts)
    again = load_or_compute_features(with_experts, ds.images, ds.extents, own, batch_size=4)
    assert calls.images == ds.num_slices and again.interm_embeddings is not None
    calls.close()
