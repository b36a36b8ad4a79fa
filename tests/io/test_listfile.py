"""``segmote ingest`` list files: header synonyms (``image,label``), csv quoting, bad headers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmote_core.cli import main as segmote_main
from segmote_core.io import open_cohort
from segmote_core.io.ingest import collect_inputs

from tests.io.volumes import ct_volume
def _pair(folder: Path) -> np.ndarray:
    vol, obj = ct_volume((4, 12, 14))
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), folder / "ct a.nii.gz")
    nib.save(nib.Nifti1Image(obj.transpose(2, 1, 0).astype(np.uint8), np.eye(4)),
             folder / "mask.nii.gz")
    return obj.astype(np.uint8)


@pytest.mark.parametrize("text", [
    "image,label\nct a.nii.gz,mask.nii.gz\n",                   # singular 'label' (was dropped)
    "Path,Mask\n\"ct a.nii.gz\",mask.nii.gz\n",                 # synonyms, quoted cell
    "label,image,case\nmask.nii.gz,ct a.nii.gz,ct_a\n",         # any column order
    "ct a.nii.gz\tmask.nii.gz\n",                               # no header, tab separated
])
def test_list_file_labels_are_paired(tmp_path, text):
    obj = _pair(tmp_path)
    (tmp_path / "cases.csv").write_text(text)
    items = collect_inputs(tmp_path / "cases.csv")
    assert [(i.image.name, i.labels.name, i.case_id) for i in items] == [
        ("ct a.nii.gz", "mask.nii.gz", "ct_a")]
    rc = segmote_main(["ingest", str(tmp_path / "cases.csv"), str(tmp_path / "c.zarr")])
    assert rc == 0
    np.testing.assert_array_equal(open_cohort(tmp_path / "c.zarr").case("ct_a").labels[...], obj)


def test_bad_list_files_name_the_file_and_line_and_create_nothing(tmp_path):
    _pair(tmp_path)
    bad = {"unknown.csv": ("image,flavour\nct a.nii.gz,x\n",
                           "line 1: unknown column(s) ['flavour']"),
           "noimage.csv": ("labels,case_id\nmask.nii.gz,a\n", "line 1: the header has no image"),
           "blank.csv": ("image,labels\n# c\n,mask.nii.gz\n", "line 3: no image path"),
           "wide.csv": ("ct a.nii.gz,mask.nii.gz,a,CT,extra\n", "line 1: 5 columns")}
    for name, (text, phrase) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as err:
            collect_inputs(tmp_path / name)
        assert name in str(err.value) and phrase in str(err.value), str(err.value)
        out = tmp_path / f"{name}.zarr"
        assert segmote_main(["ingest", str(tmp_path / name), str(out)]) == 2
        assert not out.exists()                        # an unusable list creates no cohort
