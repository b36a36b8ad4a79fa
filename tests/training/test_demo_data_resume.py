"""`segmote demo-data`: a rerun resumes an interrupted cohort and refuses foreign contents; the
written brain cases overlap nilearn's own labels at the template slices they record.
Real zarr stores on disk, the nilearn wheel's NIfTI files read with nibabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import zarr

from segmote_core.cli import main as segmote_main
from segmote_core.io import open_cohort
from training.demo_data import write_demo_cohort
from training.phantoms_brain import CROP_X, CROP_Y, mni_data_dir

FAST = ["xray_lungs", "derm_lesion"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_rerun_resumes_an_interrupted_cohort(tmp_path):
    path = tmp_path / "part.zarr"
    first = write_demo_cohort(path, small=True, seed=4, datasets=FAST)
    assert first["written"] == 2
    before = {c: np.asarray(open_cohort(path).case(c).image[...]) for c in open_cohort(path).case_ids()}
    assert write_demo_cohort(path, small=True, seed=4, datasets=FAST)["written"] == 0  # finished
    root = zarr.open_group(str(path), mode="r+")               # interrupt: one gone, one partial
    del root["xray_lungs_000"]
    root["derm_lesion_000"].attrs["complete"] = False
    assert open_cohort(path).case_ids() == []
    assert write_demo_cohort(path, small=True, seed=4, datasets=FAST)["written"] == 2
    coh = open_cohort(path)
    assert coh.case_ids() == ["derm_lesion_000", "xray_lungs_000"]
    for cid, image in before.items():
        np.testing.assert_array_equal(np.asarray(coh.case(cid).image[...]), image)
    # other parameters, or a path that is not a cohort: refused, nothing written
    with pytest.raises(FileExistsError, match="other demo parameters"):
        write_demo_cohort(path, small=True, seed=5, datasets=FAST)
    (tmp_path / "file.zarr").write_text("not a cohort")
    with pytest.raises(FileExistsError, match="not a cohort"):
        write_demo_cohort(tmp_path / "file.zarr", small=True, datasets=FAST)
    assert segmote_main(["demo-data", str(tmp_path / "file.zarr"), "--small"]) == 2
    assert (tmp_path / "file.zarr").read_text() == "not a cohort"
    with pytest.raises(ValueError, match="unknown demo dataset"):
        write_demo_cohort(tmp_path / "x.zarr", datasets=["mri_knee"])
    assert not (tmp_path / "x.zarr").exists()


def test_written_brain_overlaps_nilearn_at_recorded_template_slices(tmp_path):
    base = mni_data_dir()
    gm, wm = (np.asarray(nib.load(str(base / f"mni_icbm152_{n}_tal_nlin_sym_09a_converted.nii.gz"))
                         .dataobj, dtype=np.float32) / 255 for n in ("gm", "wm"))
    path = tmp_path / "brain.zarr"
    write_demo_cohort(path, small=True, seed=0, datasets=["mni_brain"])
    coh = open_cohort(path)
    assert coh.case_ids() == ["mni_brain_00", "mni_brain_01"]
    for cid in coh.case_ids():
        case = coh.case(cid)
        labels = np.asarray(case.labels[...])
        assert len(case.attrs["template_z"]) == labels.shape[0]
        for k, z in enumerate(case.attrs["template_z"]):
            g = gm[CROP_X[0]:CROP_X[1], CROP_Y[0]:CROP_Y[1], z].T[::-1]      # (Y, X), anterior up
            w = wm[CROP_X[0]:CROP_X[1], CROP_Y[0]:CROP_Y[1], z].T[::-1]
            brain = np.argmax(np.stack([np.clip(1 - g - w, 0, 1), g, w]), axis=0) > 0
            assert _dice(labels[k] > 0, brain) > 0.85
        spacing_z = case.spacing[0]
        assert spacing_z == pytest.approx(float(np.diff(case.attrs["template_z"]).mean()))
