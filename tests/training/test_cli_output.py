"""One output convention for every ``segmote`` command: a summary on stdout at the end, WARNING
only for warnings, a user error as one line (traceback with -v), and checks before Ray starts."""

from __future__ import annotations

import shutil
import sys
import time

import torch

from segmote_core.build import build_sam, build_segmote
from segmote_core.checkpoint import save_segmote
from segmote_core.cli import main as segmote_main
from segmote_core.config import SegMoTEConfig


def test_curate_success_is_a_stdout_summary_not_a_warning(tiny_cohort, tmp_path, capsys):
    assert segmote_main(["curate", str(tiny_cohort), str(tmp_path / "cur")]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("segmote curate: kept ") and "train " in out.out
    assert f"selection: {tmp_path / 'cur' / 'selection.json'}" in out.out
    assert "WARNING" not in out.err


def test_a_user_error_is_one_line_and_v_adds_the_traceback(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim: {epoch: 3}\n")
    assert segmote_main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segmote train: error:" in err[0]
    assert "optim: unknown keys ['epoch']" in err[0]
    assert segmote_main(["-v", "train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("segmote train: error:")
    assert segmote_main(["evaluate", "missing.safetensors", str(tmp_path / "no.zarr"),
                         str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no.zarr" in err[0]


def test_batch_without_its_sam_checkpoint_fails_before_ray(tiny_cohort, tmp_path, capsys):
    config = SegMoTEConfig(model_type="tiny", image_size=64)
    torch.manual_seed(3)
    sam = tmp_path / "sam_tiny.pth"
    torch.save(build_sam(config).state_dict(), sam)
    ckpt = save_segmote(build_segmote(config, sam_checkpoint=sam), tmp_path / "m.safetensors",
                        include_base=False)
    shutil.move(sam, tmp_path / "moved.pth")
    t0 = time.perf_counter()
    rc = segmote_main(["batch", str(tiny_cohort), str(tmp_path / "out.zarr"),
                       "--segmote-checkpoint", str(ckpt)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("segmote batch: error: ")
    assert "sam_tiny.pth" in err[0] and "--sam-checkpoint" in err[0] and "sha256" in err[0]
    assert seconds < 10
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "out.zarr").exists()
