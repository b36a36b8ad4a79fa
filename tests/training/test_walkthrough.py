"""docs/training.md's worked example, run command by command, so the page cannot rot.

The commands are parsed from the page's ``bash walkthrough`` and ``python walkthrough`` blocks
and run as written in a folder laid out as the page says (nnU-Net ``imagesTr``/``labelsTr``
NIfTI files and ``sam_vit_b_01ec64.pth``). The one substitution: the SAM file holds a small
random-weight ``tiny`` SAM, and the copied config is switched to it (model_type, image size, a
few steps). The default run stops before ``segmote batch`` at its pre-Ray checks; the slow
variant runs the batch on a local Ray too.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from segmote_core.build import build_sam
from segmote_core.cli import build_parser
from segmote_core.cli import main as segmote_main
from segmote_core.config import SegMoTEConfig

from tests.io.volumes import ct_volume

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "training.md"
TINY = {"model_type": "tiny", "image_size": 64}


def walkthrough(kind: str) -> list[str]:
    blocks = re.findall(rf"```{kind} walkthrough\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, f"docs/training.md needs one ```{kind} walkthrough block"
    return [line for line in blocks[0].splitlines() if line.strip()] if kind == "bash" \
        else [blocks[0]]


def user_folder(root: Path, cases: int = 4) -> Path:
    """What the page starts from: nnU-Net folders and the SAM checkpoint."""
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    for i in range(cases):
        vol, obj = ct_volume((4, 48, 48), seed=i)
        for sub, name, data in (("imagesTr", f"pt{i:03d}_0000.nii.gz", vol),
                                ("labelsTr", f"pt{i:03d}.nii.gz", obj.astype(np.uint8))):
            (root / "mydata" / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), aff), root / "mydata" / sub / name)
    torch.manual_seed(0)
    torch.save(build_sam(SegMoTEConfig(**TINY)).state_dict(), root / "sam_vit_b_01ec64.pth")
    return root


def shrink_config(path: Path) -> None:
    """The test's only change to the example config: the tiny SAM and a few steps."""
    cfg = yaml.safe_load(path.read_text())
    assert cfg["model"]["model_type"] == "vit_b"
    assert cfg["sam_checkpoint"] == "sam_vit_b_01ec64.pth"
    cfg["model"].update(TINY)
    cfg["optim"].update(epochs=1, steps_per_epoch=3, batch_size=2)
    cfg["num_threads"] = 2
    path.write_text(yaml.safe_dump(cfg))


def run_walkthrough(work: Path, capsys, *, with_batch: bool) -> dict[str, str]:
    outputs: dict[str, str] = {}
    for line in walkthrough("bash"):
        argv = shlex.split(line)
        if argv[0] == "cp":
            shutil.copy(ROOT / argv[1], work / argv[2])
            shrink_config(work / argv[2])
            continue
        assert argv[0] == "segmote", line
        if argv[1] == "batch" and not with_batch:
            from pipeline.cli import check_model_args

            args = build_parser().parse_args(argv[1:])
            check_model_args(args)          # what batch checks before Ray starts
            assert args.sam_checkpoint == str((work / "sam_vit_b_01ec64.pth").resolve())
            continue
        rc = segmote_main(argv[1:])
        out = capsys.readouterr()
        assert rc == 0, f"{line}\n{out.out}\n{out.err[-3000:]}"
        outputs[argv[1]] = out.out
    return outputs


def check_outputs(outputs: dict[str, str]) -> None:
    assert "4 ingested, 0 skipped, 0 failed; labels for 4 of 4 cases" in outputs["ingest"]
    assert "WARNING" not in outputs["ingest"]
    assert "segmote curate: kept" in outputs["curate"] and "selection.json" in outputs["curate"]
    train = outputs["train"]
    assert re.search(r"model: \S*runs/my_vit_b/model\.safetensors", train)
    assert "base: SAM sam_vit_b_01ec64.pth sha256 " in train
    dice = re.findall(r"mean Dice (\w+)\s+([0-9.]+)", outputs["evaluate"])
    assert {m for m, _ in dice} == {"point", "box", "auto"}
    assert all(0.0 <= float(v) <= 1.0 for _, v in dice)


def run_python(work: Path, capsys) -> None:
    [code] = walkthrough("python")
    exec(compile(code, str(DOC), "exec"), {})
    shape = capsys.readouterr().out.split(")")[0]
    assert shape == "(1, 48, 48"


def test_walkthrough_ingest_to_python(tmp_path, monkeypatch, capsys):
    work = user_folder(tmp_path)
    monkeypatch.chdir(work)
    check_outputs(run_walkthrough(work, capsys, with_batch=False))
    run_python(work, capsys)


@pytest.mark.slow
def test_walkthrough_with_batch_on_ray(tmp_path, monkeypatch, capsys):
    work = user_folder(tmp_path)
    monkeypatch.chdir(work)
    outputs = run_walkthrough(work, capsys, with_batch=True)
    check_outputs(outputs)
    assert "4 case(s): 4 segmented" in outputs["batch"]
    run_python(work, capsys)
