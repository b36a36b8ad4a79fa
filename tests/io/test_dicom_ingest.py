"""``segmote ingest`` of a DICOM tree: one case per series, named errors for bad series while
the rest ingest, no patient data in the cohort, the report or the logs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # the dicom extra

from segmote_core.cli import main as segmote_main
from segmote_core.io import open_cohort
from segmote_core.io.dicom import dicom_case_id
from segmote_core.io.ingest import ingest, report_path
from tests.io.dicom_series import (SECRETS, ct_phantom, mr_values, oblique_iop, write_scout,
                                   write_series)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture
def tree(tmp_path):
    """A hospital-style export: two patients' studies, a localizer, non-image objects, a series
    with a missing slice, a truncated file, and a NIfTI beside them."""
    import nibabel as nib

    root = tmp_path / "export"
    hu, _, spacing = ct_phantom(slices=8, size=40)
    ct = write_series(root / "A" / "ct", hu, spacing=spacing, name="IM")
    write_scout(root / "A" / "scout", ct.study_uid)
    mr = write_series(root / "B" / "mr", mr_values(), modality="MR", slope=0.25, intercept=0.0,
                      window=None, iop=oblique_iop())
    gap = write_series(root / "B" / "gap", hu, spacing=spacing, drop=(3,))
    shutil.copy(TEST_FILES / "rtstruct.dcm", root / "A" / "rtstruct.dcm")
    shutil.copy(TEST_FILES / "test-SR.dcm", root / "B" / "report.dcm")
    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", root / "DICOMDIR")
    broken = write_series(root / "C" / "broken", hu, spacing=spacing)
    data = broken.files[5].read_bytes()
    broken.files[5].write_bytes(data[:600])                      # cut inside the header
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.eye(4)), str(root / "n.nii.gz"))
    return {"root": root, "ct": ct, "mr": mr, "gap": gap, "broken": broken, "hu": hu}


def test_tree_one_case_per_series_rest_still_ingests(tmp_path, tree, caplog):
    caplog.set_level(logging.DEBUG)
    rep = ingest(tree["root"], tmp_path / "c.zarr")
    by_case = {r.case_id: r for r in rep.records}
    ct_id = dicom_case_id(tree["ct"].study_uid, tree["ct"].series_uid)
    mr_id = dicom_case_id(tree["mr"].study_uid, tree["mr"].series_uid)
    gap_id = dicom_case_id(tree["gap"].study_uid, tree["gap"].series_uid)
    assert by_case[ct_id].status == by_case[mr_id].status == by_case["n"].status == "ingested"
    assert by_case[gap_id].status == "failed"
    assert "missing slice" in by_case[gap_id].error
    assert str(tree["gap"].folder) in by_case[gap_id].error
    # the file cut inside its header (before its SeriesInstanceUID) fails by name, and the
    # rest of its series fails for the hole it leaves
    failed = [r for r in rep.records if r.status == "failed"]
    assert any(str(tree["broken"].files[5]) in r.error and "truncated" in r.error
               for r in failed)
    assert any(str(tree["broken"].folder) in r.error and "missing slice" in r.error
               for r in failed)
    notes = " ".join(r.note for r in rep.records)
    for what in ("RT Structure Set", "Comprehensive SR", "DICOMDIR", "localizer"):
        assert what in notes
    assert rep.counts() == {"ingested": 3, "skipped": 4, "failed": 3}

    cohort = open_cohort(tmp_path / "c.zarr")
    assert sorted(cohort.case_ids()) == sorted([ct_id, mr_id, "n"])
    ct = cohort.case(ct_id)
    np.testing.assert_array_equal(ct.image[...], tree["hu"])
    np.testing.assert_allclose(ct.affine, tree["ct"].affine, atol=1e-6)
    assert ct.modality == "CT" and ct.attrs["window"] == [40.0, 400.0]
    assert ct.attrs["dicom"]["n_files"] == 8 and "dicom_uids" not in ct.attrs
    mr = cohort.case(mr_id)
    assert mr.modality == "MR" and mr.image.dtype == np.float32
    np.testing.assert_allclose(mr.affine, tree["mr"].affine, atol=1e-6)

    # no patient identifier anywhere: cohort metadata, report, logs
    texts = [p.read_text(errors="ignore") for p in (tmp_path / "c.zarr").rglob("zarr.json")]
    texts += [report_path(tmp_path / "c.zarr").read_text(), caplog.text]
    for secret in SECRETS:
        assert not any(secret in t for t in texts), secret

    again = ingest(tree["root"], tmp_path / "c.zarr")            # unchanged series: skipped
    assert {r.case_id: r.status for r in again.records}[ct_id] == "skipped"


def test_keep_uids_and_case_map_through_the_cli(tmp_path, tree, capsys):
    ct, mr = tree["ct"], tree["mr"]
    cmap = tmp_path / "map.csv"
    cmap.write_text(f"SeriesInstanceUID,case_id\n{ct.series_uid},liver_007\n")
    code = segmote_main(["ingest", str(tree["root"]), str(tmp_path / "c.zarr"), "--keep-uids",
                         "--case-map", str(cmap)])
    out = capsys.readouterr()
    assert code == 1                                   # the gap and the truncated file failed
    assert "NOTE" in out.out and "localizer" in out.out
    for secret in SECRETS:
        assert secret not in out.out + out.err
    cohort = open_cohort(tmp_path / "c.zarr")
    assert "liver_007" in cohort.case_ids()
    uids = cohort.case("liver_007").attrs["dicom_uids"]
    assert uids["study"] == ct.study_uid and uids["series"] == ct.series_uid
    assert uids["sop_instances"] == ct.sop_uids                  # in slice order
    mr_case = cohort.case(dicom_case_id(mr.study_uid, mr.series_uid))
    assert mr_case.attrs["dicom_uids"]["sop_instances"] == mr.sop_uids


def test_bad_case_map_is_a_usage_error(tmp_path, tree):
    cmap = tmp_path / "map.csv"
    cmap.write_text("1.2.3,has space\n")
    code = segmote_main(["ingest", str(tree["root"]), str(tmp_path / "c.zarr"),
                         "--case-map", str(cmap)])
    assert code == 2 and not (tmp_path / "c.zarr").exists()


def test_one_dicom_file_as_source_ingests_its_series(tmp_path, tree):
    ct = tree["ct"]
    rep = ingest(ct.files[2], tmp_path / "c.zarr")
    assert [r.status for r in rep.records] == ["ingested"]
    case = open_cohort(tmp_path / "c.zarr").case(rep.records[0].case_id)
    np.testing.assert_array_equal(case.image[...], tree["hu"])
