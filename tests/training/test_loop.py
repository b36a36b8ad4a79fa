"""Acceptance 4.2 and 4.3: a short run reduces the loss, checkpoints, resumes on schedule; with
cached embeddings a step never calls the image encoder."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from segmote_core.build import load_segmote
from segmote_core.checkpoint import read_checkpoint_info
from segmote_core.config import SegMoTEConfig
from segmote_core.progress import CancelToken, Cancelled
from training.checkpointing import STATE_FILE
from training.dataset import build_slice_dataset
from training.step import training_loss
from training.train_config import LossConfig, OptimConfig, TrainConfig
from training.trainer import Trainer

MODEL = SegMoTEConfig(model_type="tiny", image_size=64, train_decoder=True)


@pytest.fixture(scope="module")
def dataset(tiny_cohort):
    return build_slice_dataset(tiny_cohort, image_size=64, split=None)


def _config(tmp_path, **optim) -> TrainConfig:
    o = dict(epochs=3, steps_per_epoch=2, batch_size=4, lr=1e-3, lr_milestones=(1, 2))
    o.update(optim)
    return TrainConfig(model=MODEL, optim=OptimConfig(**o), output_dir=str(tmp_path / "run"),
                       checkpoint_every=100, seed=1, num_threads=2)


def _fixed_loss(trainer: Trainer, steps=(0, 1, 2, 3, 4, 5)) -> float:
    """Eval-mode loss on fixed prompt batches (no router noise)."""
    trainer.model.eval()
    losses = []
    with torch.no_grad():
        for s in steps:
            b = trainer.sampler.sample(s, trainer.total_steps)
            feats = trainer.cache.get(trainer.dataset.mask_slice[b.mask_ids])
            target = torch.from_numpy(trainer.dataset.masks[b.mask_ids]).float()
            losses.append(float(training_loss(trainer.model, feats, b, target,
                                              LossConfig()).terms.total))
    trainer.model.train()
    return float(np.mean(losses))


def test_short_run_reduces_loss(dataset, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(_config(tmp_path, epochs=1, steps_per_epoch=30, lr_milestones=()),
                      dataset=dataset)
    trainer.prepare_cache()
    before = _fixed_loss(trainer)
    result = trainer.fit(show_progress=False)
    after = _fixed_loss(trainer)
    assert after < before - 0.1, (before, after)
    assert result.model_path is not None and result.model_path.is_file()
    # the final file rebuilds its own model (tiny: base embedded) with the trained weights
    loaded = load_segmote(result.model_path)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k
    info = read_checkpoint_info(result.model_path)
    assert info["training"]["data"]["datasets"]["discs"]["masks"]["disc"] == 18
    assert info["config"]["vocabulary"] == ["core", "disc", "lesion", "rim"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoint_resume_continues_schedule(dataset, tmp_path):
    # reference: one uninterrupted run of 3 epochs x 2 steps
    ref = Trainer(_config(tmp_path / "ref"), dataset=dataset)
    ref.fit(show_progress=False)
    # interrupted after 3 steps (mid epoch 2), then resumed by a new Trainer
    first = Trainer(_config(tmp_path), dataset=dataset)
    r1 = first.fit(max_steps=3, show_progress=False)
    assert r1.model_path is None
    assert (r1.position.epoch, r1.position.step, r1.position.global_step) == (1, 1, 3)
    assert (r1.checkpoint / STATE_FILE).is_file()
    resumed = Trainer(_config(tmp_path), dataset=dataset)
    assert (resumed.position.epoch, resumed.position.step, resumed.position.global_step) == \
        (1, 1, 3)
    r2 = resumed.fit(show_progress=False)
    assert (r2.position.epoch, r2.position.global_step) == (3, 6)
    rows = _rows(r2.metrics_csv)
    assert [int(r["global_step"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4,
                                                            2.5e-4, 2.5e-4])
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    # the resumed run ends where the uninterrupted one does (prompts and noise per step)
    a = load_file(str(r2.model_path))
    b = load_file(str(tmp_path / "ref" / "run" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # frozen parts did not move
    init = Trainer(_config(tmp_path / "fresh"), dataset=dataset, resume=False)
    enc = {k: v for k, v in init.model.state_dict().items() if k.startswith("sam.image_encoder.")}
    for k, v in enc.items():
        assert torch.equal(a[k], v), k


def test_cancel_leaves_resumable_checkpoint(dataset, tmp_path):
    token = CancelToken()
    trainer = Trainer(_config(tmp_path), dataset=dataset)

    def progress(done, total):
        if done == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        trainer.fit(progress=progress, cancel=token, show_progress=False)
    again = Trainer(_config(tmp_path), dataset=dataset)
    assert (again.position.epoch, again.position.step, again.position.global_step) == (1, 0, 2)
    assert again.fit(show_progress=False).position.global_step == 6


def test_cached_steps_never_call_the_encoder(dataset, tmp_path):
    trainer = Trainer(_config(tmp_path, epochs=1, steps_per_epoch=4), dataset=dataset)
    calls = []
    trainer.model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    trainer.prepare_cache()
    n_cache = len(calls)
    assert n_cache == int(np.ceil(dataset.num_slices / 8))   # one pass, batches of 8
    trainer.fit(show_progress=False)
    assert len(calls) == n_cache                               # training steps: zero calls
    # a second run reuses the signed cache file: no encoder call at all
    calls.clear()
    other = Trainer(_config(tmp_path, epochs=1, steps_per_epoch=4), dataset=dataset,
                    resume=False)
    other.model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    other.prepare_cache()
    assert calls == []
    # without the cache every step runs the encoder
    nocache = Trainer(_config(tmp_path / "nc", epochs=1, steps_per_epoch=3).replace(
        cache_embeddings=False), dataset=dataset)
    nocache.model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    nocache.fit(show_progress=False)
    assert len(calls) == 3


def test_sam_phase_trains_encoder_end_to_end(dataset, tmp_path):
    cfg = _config(tmp_path, epochs=1, steps_per_epoch=3).replace(phase="sam", augment=True)
    trainer = Trainer(cfg, dataset=dataset)
    assert trainer.model.expert_decoder.num_expert_tokens == 0
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in
                 trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder",
                         "text_encoder.table"}
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit(show_progress=False)
    after = trainer.model.state_dict()
    assert not torch.equal(before["sam.image_encoder.patch_embed.proj.weight"],
                           after["sam.image_encoder.patch_embed.proj.weight"])
    assert {r["mode"] for r in _rows(result.metrics_csv)} <= {"box", "points"}
    # phase 2 seeds its SAM from the phase-1 file and trains only the SegMoTE parts
    cfg2 = _config(tmp_path / "p2", epochs=1, steps_per_epoch=2).replace(
        init_checkpoint=str(result.model_path))
    p2 = Trainer(cfg2, dataset=dataset)
    for k, v in after.items():
        if k.startswith("sam."):
            assert torch.equal(p2.model.state_dict()[k], v), k
    assert not any(p.requires_grad for p in p2.model.sam.image_encoder.parameters())
