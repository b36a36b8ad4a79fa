"""Fine-tuning from reviewed corrections (docs/training.md, "Learning from corrections").

The output store is laid out as ``segmote batch`` writes it (docs/formats.md) with pre-labels
the bundled demo model made (PPT, in process) and corrections saved by the core's
``save_correction`` (the Review panel's path); the reviewer's corrections are the cohort's
ground truth.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from segmote_core.build import demo_model_path, load_demo_model, load_segmote
from segmote_core.checkpoint import read_checkpoint_info
from segmote_core.checkpoint import upgrade_state_keys
from segmote_core.finetune import FineTuneConfig, finetune_from_store
from segmote_core.inference import segment_batch
from segmote_core.io import open_cohort
from segmote_core.predictor import model_signature
from segmote_core.progress import CancelToken, Cancelled
from segmote_core.review import save_correction
from segmote_core.reviewed import FineTuneDataError

FAST = FineTuneConfig(steps=6, batch_size=2, eval_every=3, checkpoint_every=2)


def write_store(out: Path, cohort: Path, model) -> list[str]:
    """Pre-label every case of ``cohort`` with ``model`` into a batch-layout store ``out``."""
    sig = {"model": model_signature(model), "mode": "auto", "label_value": 1}
    root = zarr.open_group(str(out), mode="w")
    root.attrs.update({"segmote": {"kind": "labels", "version": 1},
                       "cohort": str(Path(cohort).resolve()), "signature": sig})
    ids = []
    for case in open_cohort(cohort):
        img = np.asarray(case.image[...])
        vol = case.axes == "ZYX"
        res = segment_batch(model, img if vol else img[None], case.modality, precision="fp32")
        labels = res.masks.astype(np.uint8) if vol else res.masks[0].astype(np.uint8)
        g = root.create_group(case.case_id)
        arr = g.create_array("labels", shape=labels.shape, dtype=np.uint8,
                             chunks=(1, *labels.shape[1:]) if vol else labels.shape)
        arr[...] = labels
        arr.attrs.update({"signature_sha256": "x", "qc": [0.5] * (len(labels) if vol else 1),
                          "complete": True})
        ids.append(case.case_id)
    return ids


@pytest.fixture(scope="module")
def reviewed_store(tmp_path_factory, tiny_cohort):
    out = tmp_path_factory.mktemp("corrections") / "labels.zarr"
    ids = write_store(out, tiny_cohort, load_demo_model())
    cohort = open_cohort(tiny_cohort)
    discs = [c for c in ids if "disc" in c][:3]
    for case in discs:
        save_correction(out, case, (np.asarray(cohort.case(case).labels[...]) > 0).astype(np.uint8))
    return out, tiny_cohort, discs


@pytest.fixture(scope="module")
def shared_embeddings(tmp_path_factory):
    """One embedding cache for the module's fine-tunes, as a user's cache outlives a run: the
    default demo model's encoder takes ~2 s a slice here, so each slice is embedded once."""
    return tmp_path_factory.mktemp("embeddings")


@pytest.mark.slow    # a fine-tune of the demo model (~90 s); CI runs it too
def test_finetune_changes_only_the_trainable_additions_and_records_lineage(reviewed_store,
                                                                           shared_embeddings,
                                                                           tmp_path):
    out, cohort, discs = reviewed_store
    new = tmp_path / "round1.safetensors"
    res = finetune_from_store(out, "demo", new, config=FAST, cache_dir=shared_embeddings)
    parent = upgrade_state_keys(load_file(str(demo_model_path())))
    child = load_file(str(new))
    assert set(child) == set(parent)
    enc = [k for k in parent if k.startswith("sam.image_encoder.")]
    if enc:   # a base held in the file (the tiny demo): its encoder's bytes are identical
        assert all(torch.equal(parent[k], child[k]) for k in enc)
    else:     # a packaged base (LiteMedSAM, the default demo): never copied, the same recorded
        assert not any(k.startswith("sam.image_encoder.") for k in child)
        assert read_checkpoint_info(new)["base"] == read_checkpoint_info(demo_model_path())["base"]
        assert read_checkpoint_info(new)["base"]["name"] == "LiteMedSAM"
    frozen = [k for k in parent if k.startswith("sam.prompt_encoder.")]
    assert all(torch.equal(parent[k], child[k]) for k in frozen)
    changed = [k for k in parent if not torch.equal(parent[k], child[k])]
    if res.best_step > 0:
        assert changed and all(not k.startswith(("sam.image_encoder.", "sam.prompt_encoder."))
                               for k in changed)
    info = json.loads(new.with_suffix(".json").read_text())
    lin = info["training"]["lineage"]
    assert lin["parent_weights_sha256"] == model_signature(load_demo_model())["weights_sha256"]
    assert sorted(lin["train_cases"] + lin["val_cases"]) == sorted(discs)
    assert set(lin["val_cases"]).isdisjoint(lin["train_cases"]) and lin["val_cases"]
    assert lin["steps"] == FAST.steps and lin["best_step"] in (0, 3, 6)
    assert lin["val_dice_before"] == pytest.approx(res.dice_before)
    assert lin["val_dice_after"] >= lin["val_dice_before"]
    assert load_segmote(new).config == load_demo_model().config           # loads, same model
    assert not new.with_suffix(".finetune_state.pt").exists()


@pytest.mark.slow
def test_the_encoder_runs_once_per_slice_ever(reviewed_store, tmp_path):
    out, _, _ = reviewed_store
    model = load_demo_model()
    calls = []
    hook = model.sam.image_encoder.register_forward_hook(
        lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        finetune_from_store(out, model, tmp_path / "a.safetensors", config=FAST,
                            cache_dir=tmp_path / "emb")
        first = sum(calls)
        finetune_from_store(out, model, tmp_path / "b.safetensors", config=FAST,
                            cache_dir=tmp_path / "emb")
    finally:
        hook.remove()
    assert first > 0 and sum(calls) == first


@pytest.mark.slow    # three fine-tunes of the default demo model (~45 s); CI runs it after the default run
def test_cancel_then_resume_equals_an_uninterrupted_run(reviewed_store, shared_embeddings,
                                                        tmp_path):
    out, _, _ = reviewed_store
    full = finetune_from_store(out, "demo", tmp_path / "full.safetensors", config=FAST,
                               cache_dir=shared_embeddings)
    token = CancelToken()
    seen = []

    def progress(done, total):
        seen.append(done)
        if total == FAST.steps and done == 3:
            token.cancel()
    with pytest.raises(Cancelled):
        finetune_from_store(out, "demo", tmp_path / "cut.safetensors", config=FAST,
                            cache_dir=shared_embeddings, progress=progress, cancel=token)
    assert not (tmp_path / "cut.safetensors").exists()                  # the old model stays
    assert (tmp_path / "cut.finetune_state.pt").is_file()
    resumed = finetune_from_store(out, "demo", tmp_path / "cut.safetensors", config=FAST,
                                  cache_dir=shared_embeddings)
    a, b = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "cut.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == full.history


def test_clear_errors(reviewed_store, tmp_path):
    out, _, _ = reviewed_store
    bare = tmp_path / "bare.zarr"       # the same overnight output before anyone reviewed it
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("corrections"))
    with pytest.raises(FineTuneDataError, match="no reviewed case"):
        finetune_from_store(bare, "demo", tmp_path / "x.safetensors", config=FAST)
    other = tmp_path / "other.zarr"
    other.mkdir()
    with pytest.raises(FineTuneDataError, match="not from .*other.zarr"):
        finetune_from_store(out, "demo", tmp_path / "x.safetensors", cohort=other, config=FAST)
    from segmote_core import SegMoTEConfig, build_segmote

    torch.manual_seed(0)
    foreign = build_segmote(SegMoTEConfig(model_type="tiny", image_size=128, num_experts=2))
    with pytest.raises(ValueError, match="another architecture.*num_experts"):
        finetune_from_store(out, foreign, tmp_path / "x.safetensors", config=FAST)
    assert not (tmp_path / "x.safetensors").exists()
