"""Labels pair with their images the way people store them (nnU-Net, ``_seg`` suffixes), and a
case whose labels are missing is said so: a warning by default, an error with --require-labels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmote_core.cli import main as segmote_main
from segmote_core.io import open_cohort
from segmote_core.io.ingest import collect_inputs, ingest

from tests.io.volumes import ct_volume

AFF = np.diag([0.8, 0.8, 2.5, 1.0])


def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFF), path)
    return path


def nnunet_layout(root: Path, n: int = 3, missing: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """``imagesTr/pt00i_0000.nii.gz`` + ``labelsTr/pt00i.nii.gz`` (labels of ``missing`` left out)."""
    truth = {}
    for i in range(n):
        vol, obj = ct_volume((4, 16, 18), seed=i)
        lab = (obj > 0).astype(np.uint8) * (i + 1)
        _save(root / "imagesTr" / f"pt{i:03d}_0000.nii.gz", vol.transpose(2, 1, 0))
        if i not in missing:
            _save(root / "labelsTr" / f"pt{i:03d}.nii.gz", lab.transpose(2, 1, 0))
        truth[f"pt{i:03d}"] = lab
    return truth


def test_nnunet_layout_pairs_every_case(tmp_path):
    truth = nnunet_layout(tmp_path)
    items = collect_inputs(tmp_path / "imagesTr", tmp_path / "labelsTr")
    assert {it.case_id: it.labels.name for it in items} == {
        "pt000": "pt000.nii.gz", "pt001": "pt001.nii.gz", "pt002": "pt002.nii.gz"}
    rep = ingest(tmp_path / "imagesTr", tmp_path / "c.zarr", labels=tmp_path / "labelsTr")
    assert rep.counts() == {"ingested": 3, "skipped": 0, "failed": 0}
    assert rep.labelled == 3 and not rep.warnings
    cohort = open_cohort(tmp_path / "c.zarr")
    for cid, lab in truth.items():
        np.testing.assert_array_equal(np.asarray(cohort.case(cid).labels), lab)


@pytest.mark.parametrize("tag", ["_seg", "_label", "_labels", "_mask", "_gt"])
def test_suffix_tags_pair_in_a_labels_folder_and_beside_the_image(tmp_path, tag):
    vol, obj = ct_volume((3, 12, 14))
    _save(tmp_path / "img" / "liver7.nii.gz", vol.transpose(2, 1, 0))
    _save(tmp_path / "lab" / f"liver7{tag}.nii.gz", obj.astype(np.uint8).transpose(2, 1, 0))
    _save(tmp_path / "both" / "liver7.nii.gz", vol.transpose(2, 1, 0))
    _save(tmp_path / "both" / f"liver7{tag}.nii.gz", obj.astype(np.uint8).transpose(2, 1, 0))
    [a] = collect_inputs(tmp_path / "img", tmp_path / "lab")
    [b] = collect_inputs(tmp_path / "both")
    assert a.labels == tmp_path / "lab" / f"liver7{tag}.nii.gz"
    assert b.labels == tmp_path / "both" / f"liver7{tag}.nii.gz" and b.case_id == "liver7"


def test_plain_case_name_beside_the_image_is_another_image_not_labels(tmp_path):
    vol, _ = ct_volume((3, 12, 14))
    _save(tmp_path / "img" / "a_0000.nii.gz", vol.transpose(2, 1, 0))
    _save(tmp_path / "img" / "a.nii.gz", vol.transpose(2, 1, 0))
    items = collect_inputs(tmp_path / "img")
    assert all(it.labels is None for it in items)


def test_missing_labels_warn_in_the_summary_and_fail_when_required(tmp_path, capsys):
    nnunet_layout(tmp_path, n=3, missing=(1,))
    args = [str(tmp_path / "imagesTr"), str(tmp_path / "c.zarr"), "--labels",
            str(tmp_path / "labelsTr")]
    assert segmote_main(["ingest", *args]) == 0
    out = capsys.readouterr().out
    assert "3 ingested, 0 skipped, 0 failed; labels for 2 of 3 cases" in out
    warn = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warn) == 1 and "pt001" in warn[0] and "labelsTr" in warn[0]
    assert open_cohort(tmp_path / "c.zarr").case("pt001").labels is None

    assert segmote_main(["ingest", *args[:1], str(tmp_path / "r.zarr"), *args[2:],
                         "--require-labels"]) == 1
    out = capsys.readouterr().out
    assert "2 ingested, 0 skipped, 1 failed; labels for 2 of 2 cases" in out
    assert "FAILED pt001" in out and "no label file" in out
    assert open_cohort(tmp_path / "r.zarr").case_ids() == ["pt000", "pt002"]
