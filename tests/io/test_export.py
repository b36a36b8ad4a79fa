"""`segmote export`: reviewed corrections before pre-labels, NIfTI in the source geometry (an
oblique LPS source round-trips voxel- and affine-exact), PNG/TIFF for 2D, labels.csv, clear
errors for bad input, and the output store left as it was."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.store import OutputStore
from segmote_core.cli import main as segmote_main
from segmote_core.io import open_cohort
from segmote_core.io.ingest import ingest
from segmote_core.review import read_correction, save_correction


def _oblique_lps_affine() -> np.ndarray:
    """Voxel axes pointing Left, Posterior, Superior (negative x and y columns in RAS world),
    rotated 12 degrees about z and 7 about x: an oblique acquisition."""
    a, b = np.deg2rad(12), np.deg2rad(7)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([-0.8, -0.9, 2.5])
    aff[:3, 3] = [101.5, -37.25, 12.0]
    return aff


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def store(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 10, (20, 24, 5)).astype(np.int16)  # (X, Y, Z) as on disk
    vol[5:14, 6:18, 1:4] += 300
    nii = nib.Nifti1Image(vol, _oblique_lps_affine())
    nii.set_qform(_oblique_lps_affine(), code=1)
    nib.save(nii, src / "vol.nii.gz")
    nib.save(nib.Nifti1Image(vol[..., ::-1].copy(), _oblique_lps_affine()), src / "half.nii.gz")
    img2d = rng.integers(0, 60, (40, 36), dtype=np.uint8)
    img2d[10:30, 8:20] = 200
    Image.fromarray(img2d).save(src / "xray.png")
    cohort = tmp_path / "cohort.zarr"
    rep = ingest(src, cohort, attrs={"categories": {"1": "liver"}})
    assert rep.ok, rep.to_csv()
    out = tmp_path / "labels.zarr"
    coh = open_cohort(cohort)
    labels = {}
    with OutputStore(out, cohort, {"model": "test"}) as st:
        for case_id in ("vol", "xray", "half"):
            image = np.asarray(coh.case(case_id).image[...])
            lab = (image > 150).astype(np.uint8)
            labels[case_id] = lab
            st.begin(case_id, lab.shape)
            if lab.ndim == 3:
                st.write(case_id, 0, lab)
            else:
                st.write(case_id, 0, lab[None])
            if case_id != "half":  # "half" stays incomplete, as a killed run leaves it
                st.finish(case_id, np.full(len(lab) if lab.ndim == 3 else 1, 0.3),
                          np.zeros(len(lab) if lab.ndim == 3 else 1, np.int16),
                          {"mode": "auto", "qc": [0.9] * (len(lab) if lab.ndim == 3 else 1)})
    return {"src": src, "cohort": cohort, "out": out, "labels": labels, "vol": vol}


def test_export_round_trips_an_oblique_lps_source_with_the_reviewed_correction(store, tmp_path,
                                                                                  capsys):
    out, src = store["out"], store["src"]
    corrected = store["labels"]["vol"].copy()
    corrected[2, 3:7, 4:9] = 2  # a second structure painted on slice 2
    save_correction(out, "vol", corrected)
    got, attrs = read_correction(out, "vol")
    assert np.array_equal(got, corrected) and attrs["reviewed"] is True
    assert attrs["edited_slices"] == [2]
    before = _tree_digest(out)
    dest = tmp_path / "export"
    rc = segmote_main(["export", str(out), str(dest), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1  # the incomplete case is an error, named; the others are written
    assert "half" in err and "incomplete" in err
    assert _tree_digest(out) == before  # nothing in the store changed
    source = nib.load(src / "vol.nii.gz")
    exported = nib.load(dest / "vol.nii.gz")
    assert exported.shape == source.shape
    np.testing.assert_allclose(exported.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(exported.affine) == nib.aff2axcodes(source.affine)
    # voxel-exact: the exported (X, Y, Z) array is the corrected (Z, Y, X) one transposed
    np.testing.assert_array_equal(np.asarray(exported.dataobj), corrected.transpose(2, 1, 0))
    # and in the source's own voxel grid the labels sit on the bright object
    data = np.asarray(exported.dataobj)
    assert (store["vol"][data == 1] > 150).all()
    rows = list(csv.DictReader(open(dest / "labels.csv")))
    assert {(r["case"], r["value"], r["category"], r["source"]) for r in rows} == {
        ("vol", "1", "liver", "reviewed"), ("vol", "2", "label 2", "reviewed"),
        ("xray", "1", "liver", "pre-label")}
    png2d = nib.load(dest / "xray.nii.gz")
    assert png2d.shape == (36, 40)  # NIfTI (X, Y) of the (Y, X) image


def test_export_2d_as_png_and_bad_inputs(store, tmp_path, capsys):
    out, cohort = store["out"], store["cohort"]
    dest = tmp_path / "png"
    rc = segmote_main(["export", str(out), str(dest), "--format", "png", "--cases", "xray",
                       "vol", "--no-progress"])
    assert rc == 0
    assert np.array_equal(np.asarray(Image.open(dest / "xray.png")), store["labels"]["xray"])
    assert (dest / "vol.nii.gz").is_file()  # a volume keeps its geometry in NIfTI
    capsys.readouterr()
    # a cohort is not an output store
    assert segmote_main(["export", str(cohort), str(tmp_path / "x")]) == 2
    assert "not an output store" in capsys.readouterr().err
    # the cohort has moved: the error says where it looked
    before = _tree_digest(out)
    shutil.move(cohort, tmp_path / "moved.zarr")
    assert segmote_main(["export", str(out), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert str(cohort) in err and "not where the store records it" in err
    assert _tree_digest(out) == before
    # an unknown case
    shutil.move(tmp_path / "moved.zarr", cohort)
    assert segmote_main(["export", str(out), str(tmp_path / "z"), "--cases", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_export_dicom_seg_lands_on_the_source_slices(tmp_path):
    pytest.importorskip("highdicom")
    from tests.io.dicom_series import ct_phantom, oblique_iop, write_series
    from tests.io.test_dicom_seg import check_seg
    from training.phantoms_ct import CT_CATEGORIES

    hu, labels, spacing = ct_phantom(slices=6, size=40)
    s = write_series(tmp_path / "dicom" / "ct", hu, spacing=spacing, iop=oblique_iop())
    cohort = tmp_path / "cohort.zarr"
    rep = ingest(tmp_path / "dicom", cohort, keep_uids=True, case_map={s.series_uid: "ct"},
                 attrs={"categories": dict(CT_CATEGORIES)})
    assert rep.ok, rep.to_csv()
    out = tmp_path / "labels.zarr"
    with OutputStore(out, cohort, {"model": "test"}) as st:
        st.begin("ct", labels.shape)
        st.write("ct", 0, labels.astype(np.uint8))
        st.finish("ct", np.zeros(len(labels)), np.zeros(len(labels), np.int16), {"mode": "box"})
    dest = tmp_path / "seg"
    assert segmote_main(["export", str(out), str(dest), "--format", "dicom-seg",
                         "--no-progress"]) == 0
    cats = {int(k): v for k, v in CT_CATEGORIES.items()}
    check_seg(dest / "ct.seg.dcm", s, labels, cats)
    rows = list(csv.DictReader(open(dest / "labels.csv")))
    assert {r["category"] for r in rows} == {cats[v] for v in np.unique(labels) if v}
