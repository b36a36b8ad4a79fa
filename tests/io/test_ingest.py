"""Bad inputs name the file and the problem; ``segmote ingest`` reports them and completes the rest."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from segmote_core.cli import main as segmote_main
from segmote_core.io import ImageReadError, ImageTypeError, open_cohort, open_image
from segmote_core.io.ingest import case_id_from_path, ingest, report_path

from tests.io.volumes import ct_volume
AFF = np.diag([0.9, 0.9, 3.0, 1.0])


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFF) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def make_bad(folder: Path) -> dict[str, tuple[str, str]]:
    """Broken files -> (case id, a phrase the error must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    vol, _ = ct_volume((6, 16, 20))
    good = _nifti(folder / "source_ok.nii.gz", vol.transpose(2, 1, 0)).read_bytes()
    (folder / "source_ok.nii.gz").unlink()
    (folder / "corrupt.nii.gz").write_bytes(b"\x00not a nifti at all" * 20)
    (folder / "corrupt_png.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 30)
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (folder / "empty.nii.gz").write_bytes(b"")
    _nifti(folder / "fourd.nii.gz", np.zeros((8, 8, 4, 3), np.float32))
    _nifti(folder / "nanfilled.nii.gz", np.full((8, 8, 4), np.nan, np.float32))
    _nifti(folder / "complexdtype.nii", np.zeros((8, 8, 4), np.complex64))
    tifffile.imwrite(folder / "booltext.tif", np.zeros((4, 8, 8), np.uint8))
    (folder / "booltext.tif").write_bytes((folder / "booltext.tif").read_bytes()[:40])
    return {"corrupt.nii.gz": ("corrupt", "cannot read as nifti"),
            "corrupt_png.png": ("corrupt_png", "cannot read as pil"),
            "truncated.nii.gz": ("truncated", "truncated or corrupt"),
            "empty.nii.gz": ("empty", "file is empty"),
            "fourd.nii.gz": ("fourd", "4D NIfTI image of shape (8, 8, 4, 3)"),
            "nanfilled.nii.gz": ("nanfilled", "NaN or infinite"),
            "complexdtype.nii": ("complexdtype", "dtype complex64"),
            "booltext.tif": ("booltext", "cannot read as tiff")}


def make_good(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    vol, obj = ct_volume((5, 16, 20))
    _nifti(folder / "liver_001_0000.nii.gz", vol.transpose(2, 1, 0))
    _nifti(folder / "liver_001_seg.nii.gz", obj.transpose(2, 1, 0).astype(np.float32))
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "skin 02.png")
    return {"liver_001": vol, "skin_02": rgb, "liver_001/labels": obj.astype(np.uint16)}


def test_each_bad_input_names_the_file_and_the_problem(tmp_path):
    for name, (_, phrase) in make_bad(tmp_path).items():
        with pytest.raises(ImageReadError) as err:
            open_image(tmp_path / name)
        assert str(tmp_path / name) in str(err.value), name
        assert phrase in str(err.value), (name, str(err.value))
        assert err.value.path == str(tmp_path / name)
    with pytest.raises(ImageTypeError):      # also a TypeError
        open_image(tmp_path / "complexdtype.nii")
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        open_image(tmp_path / "missing.nii")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageReadError, match="unsupported format"):
        open_image(tmp_path / "notes.txt")


def test_ingest_reports_bad_files_and_completes_the_good(tmp_path):
    src = tmp_path / "in"
    bad = make_bad(src)
    good = make_good(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    cohort = tmp_path / "cohort.zarr"
    seen = []
    rep = ingest(src, cohort, attrs={"dataset": "demo"}, progress=lambda d, t: seen.append((d, t)))

    assert rep.counts() == {"ingested": 2, "skipped": 0, "failed": len(bad)}
    assert seen[-1] == (len(bad) + 2, len(bad) + 2)
    errors = {r.case_id: r.error for r in rep.failed}
    for name, (cid, phrase) in bad.items():
        assert name in errors[cid] and phrase in errors[cid], (cid, errors.get(cid))
    coh = open_cohort(cohort)
    assert coh.case_ids() == ["liver_001", "skin_02"]               # no half-written groups
    assert sorted(n for n, _ in zarr.open_group(str(cohort), mode="r").groups()) == coh.case_ids()
    liver = coh.case("liver_001")
    np.testing.assert_array_equal(liver.image[...], good["liver_001"])
    np.testing.assert_array_equal(liver.labels[...], good["liver_001/labels"])
    assert liver.image.chunks == (1, 16, 20) and liver.modality == "CT"
    assert liver.spacing == pytest.approx((3.0, 0.9, 0.9))
    assert liver.attrs["dataset"] == "demo" and liver.attrs["complete"] is True
    skin = coh.case("skin_02")
    np.testing.assert_array_equal(skin.image[...], good["skin_02"])
    assert skin.modality == "DERM" and skin.labels is None
    csv = report_path(cohort).read_text()
    assert csv.count("failed") == len(bad) and "fourd.nii.gz" in csv
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before     # inputs untouched


def test_ingest_is_idempotent_and_redoes_changed_or_interrupted_cases(tmp_path):
    src = tmp_path / "in"
    make_good(src)
    cohort = tmp_path / "c.zarr"
    assert ingest(src, cohort).counts()["ingested"] == 2
    again = ingest(src, cohort)
    assert again.counts() == {"ingested": 0, "skipped": 2, "failed": 0}
    # a changed source is re-ingested; an interrupted case (complete=false) is redone
    vol, _ = ct_volume((5, 16, 20), seed=3)
    _nifti(src / "liver_001_0000.nii.gz", vol.transpose(2, 1, 0))
    root = zarr.open_group(str(cohort), mode="r+")
    root["skin_02"].attrs["complete"] = False
    assert open_cohort(cohort).case_ids() == ["liver_001"]
    third = ingest(src, cohort)
    assert third.counts() == {"ingested": 2, "skipped": 0, "failed": 0}
    np.testing.assert_array_equal(open_cohort(cohort).case("liver_001").image[...], vol)
    inside = ingest(src, src / "inside.zarr")              # the output is not taken as an input
    assert sorted(r.case_id for r in inside.records) == ["liver_001", "skin_02"] and inside.ok


def test_list_file_with_labels_and_modality(tmp_path):
    make_good(tmp_path / "data")
    lst = tmp_path / "cases.csv"
    lst.write_text("image,labels,case_id,modality\n"
                   "data/liver_001_0000.nii.gz,data/liver_001_seg.nii.gz,L1,CT\n"
                   "# a comment\n"
                   "data/skin 02.png,,S2,DERM\n"
                   "data/nothing.nii.gz,,N3,CT\n")
    rep = ingest(lst, tmp_path / "c.zarr")
    assert [(r.case_id, r.status) for r in rep.records] == [
        ("L1", "ingested"), ("S2", "ingested"), ("N3", "failed")]
    assert "nothing.nii.gz" in rep.records[2].error
    assert open_cohort(tmp_path / "c.zarr").case("L1").labels is not None


def test_labels_that_do_not_fit_the_image_fail_that_case(tmp_path):
    vol, obj = ct_volume((5, 16, 20))
    _nifti(tmp_path / "a.nii.gz", vol.transpose(2, 1, 0))
    _nifti(tmp_path / "a_seg.nii.gz", obj[:, :, :-1].transpose(2, 1, 0).astype(np.uint8))
    _nifti(tmp_path / "b.nii.gz", vol.transpose(2, 1, 0))
    _nifti(tmp_path / "b_seg.nii.gz", (obj * 0.5).transpose(2, 1, 0).astype(np.float32))
    _nifti(tmp_path / "c.nii.gz", vol.transpose(2, 1, 0))
    rep = ingest(tmp_path, tmp_path / "out.zarr")
    st = {r.case_id: (r.status, r.error) for r in rep.records}
    assert st["a"][0] == "failed" and "labels shape (5, 16, 19) differs" in st["a"][1]
    assert st["b"][0] == "failed" and "non-integer" in st["b"][1] and "b_seg.nii.gz" in st["b"][1]
    assert st["c"] == ("ingested", "")
    assert open_cohort(tmp_path / "out.zarr").case_ids() == ["c"]


def test_cli_ingest(tmp_path, capsys):
    src = tmp_path / "in"
    make_good(src)
    (src / "broken.nii.gz").write_bytes(b"xx")
    cohort = tmp_path / "cli.zarr"
    rc = segmote_main(["ingest", str(src), str(cohort), "--dataset", "d1",
                       "--category", "1=tumour", "--report-json"])
    out = capsys.readouterr().out
    assert rc == 1                                      # one case failed, the rest completed
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {r["case_id"]: r["status"] for r in rows} == {
        "broken": "failed", "liver_001": "ingested", "skin_02": "ingested"}
    assert "2 ingested, 0 skipped, 1 failed" in out and "FAILED broken" in out
    case = open_cohort(cohort).case("liver_001")
    assert case.attrs["categories"] == {"1": "tumour"} and case.attrs["dataset"] == "d1"
    (src / "broken.nii.gz").unlink()
    assert segmote_main(["ingest", str(src), str(cohort)]) == 0
    assert "0 ingested, 2 skipped, 0 failed" in capsys.readouterr().out
    assert segmote_main(["ingest", str(tmp_path / "nowhere"), str(cohort)]) == 2


def test_case_ids_from_file_names():
    assert case_id_from_path("/x/BraTS_001_0000.nii.gz") == "BraTS_001"
    assert case_id_from_path("a b(1).ome.tif") == "a_b_1_"
    assert case_id_from_path("ISIC_0001.JPG") == "ISIC_0001"


def test_cohort_write_case_contract(tmp_path):
    from segmote_core.io import CohortError, CohortNotFoundError, create_cohort, write_case
    from segmote_core.progress import CancelToken, Cancelled

    root = tmp_path / "c.zarr"
    with pytest.raises(CohortNotFoundError, match="c.zarr"):
        open_cohort(root)
    create_cohort(root)
    create_cohort(root)                                          # idempotent
    vol, obj = ct_volume((4, 12, 14))
    write_case(root, "a", vol, spacing=(2.0, 1.0, 1.0), modality="CT", labels=obj.astype(np.uint8),
               attrs={"dataset": "old"})
    with pytest.raises(CohortError, match="case exists"):
        write_case(root, "a", vol, overwrite=False)
    write_case(root, "a", vol[:2], spacing=(2.0, 1.0, 1.0), modality="CT")
    case = open_cohort(root).case("a")
    assert case.image.shape == (2, 12, 14) and case.labels is None
    assert "dataset" not in case.attrs                           # no stale attrs from before
    np.testing.assert_allclose(case.affine @ [1, 2, 3, 1], [3, 2, 2, 1])   # (z,y,x)->(x,y,z) mm
    token = CancelToken()
    with pytest.raises(Cancelled):
        write_case(root, "b", vol, spacing=(2.0, 1.0, 1.0), modality="CT", cancel=token,
                   progress=lambda d, t: token.cancel() if d == 2 else None)
    assert open_cohort(root).case_ids() == ["a"]                 # b is incomplete: hidden
    assert open_cohort(root).case_ids(include_incomplete=True) == ["a", "b"]
    with pytest.raises(CohortError, match="no case 'zz'"):
        open_cohort(root).case("zz")
    with pytest.raises(ValueError, match="invalid case id"):
        write_case(root, "../x", vol)
    with pytest.raises(ImageReadError, match=r"c.zarr/d: labels shape \(4, 12, 13\) differs"):
        write_case(root, "d", vol, labels=np.zeros((4, 12, 13), np.uint8))
    with pytest.raises(ImageReadError, match="labels hold negative ids"):
        write_case(root, "e", vol, labels=-obj.astype(np.int8))
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.attrs["x"] = 1
    with pytest.raises(CohortError, match="not a SegMoTE cohort"):
        open_cohort(tmp_path / "plain.zarr")
