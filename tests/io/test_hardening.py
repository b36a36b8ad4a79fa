"""Hostile-but-fair inputs to the readers and ``segmote ingest``: header bombs refused before any
allocation, one writer per cohort, no silent replacement of a case from another source, reserved
and invalid case ids failing their row only, all-NaN slices, malformed metadata named."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from PIL import Image

from segmote_core.io import (CohortError, ImageReadError, create_cohort, open_cohort, open_image,
                             write_case)
from segmote_core.io.image import ReadLimits
from segmote_core.io.ingest import ingest, report_path
from segmote_core.locking import StoreLock
from tests.io.volumes import ct_volume

REPO = Path(__file__).resolve().parents[2]


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 3.0, 1.0])), path)
    return path


def _segmote(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segmote_core.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


# ------------------------------------------------------------ size budgets from headers
def nifti_bomb(path: Path, shape=(50000, 50000)) -> Path:
    """A ~60-byte .nii.gz whose NIfTI-2 header declares ``shape`` uint8 (no data)."""
    hdr = nib.Nifti2Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    buf = io.BytesIO()
    hdr.write_to(buf)
    path.write_bytes(gzip.compress(buf.getvalue() + b"\0" * 4))
    return path


def png_bomb(path: Path, width=50000, height=50000) -> Path:
    """A valid small PNG whose IHDR claims ``width x height``."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_header_bombs_are_refused_before_any_allocation(tmp_path):
    """97-byte .nii.gz declaring 50000 x 50000 drove ingest to 10 GB: now refused at once, by
    every reader, naming the file and the budget (and how to raise it)."""
    arr = zarr.create_array(str(tmp_path / "big.zarr"), shape=(50000, 50000), dtype="uint8",
                            chunks=(1000, 1000), fill_value=0)
    vol = zarr.create_array(str(tmp_path / "vol.zarr"), shape=(40000, 2000, 2000),
                            dtype="int16", chunks=(1, 2000, 2000), fill_value=0)
    del arr, vol
    for path in (nifti_bomb(tmp_path / "bomb.nii.gz"), png_bomb(tmp_path / "bomb.png"),
                 tmp_path / "big.zarr", tmp_path / "vol.zarr"):
        t0 = time.perf_counter()
        with pytest.raises(ImageReadError) as err:
            open_image(path)
        assert time.perf_counter() - t0 < 5, path
        msg = str(err.value)
        assert msg.startswith(str(path)) and "budget" in msg and "--max-" in msg, msg
    assert "per-volume budget" in str(pytest.raises(ImageReadError, open_image,
                                                    tmp_path / "vol.zarr").value)


def test_size_budget_can_be_raised_or_lowered(tmp_path, monkeypatch):
    path = _nifti(tmp_path / "ct.nii.gz", ct_volume((6, 64, 64))[0].transpose(2, 1, 0))
    assert open_image(path).shape == (6, 64, 64)
    with pytest.raises(ImageReadError, match="per-slice budget of 0.001 MiB"):
        open_image(path, limits=ReadLimits(slice_mb=0.001))
    monkeypatch.setenv("SEGMOTE_MAX_VOLUME_MB", "0.01")
    with pytest.raises(ImageReadError, match="per-volume budget of 0.01 MiB"):
        open_image(path)
    assert open_image(path, limits=ReadLimits(volume_mb=1)).shape == (6, 64, 64)
    rep = ingest([path], tmp_path / "c.zarr")  # ingest reads through the same budgets
    assert rep.failed and "per-volume budget" in rep.failed[0].error
    rep = ingest([path], tmp_path / "c.zarr", limits=ReadLimits(volume_mb=1))
    assert rep.ok and rep.counts()["ingested"] == 1


def test_ingest_cli_refuses_a_header_bomb_quickly(tmp_path):
    bomb = nifti_bomb(tmp_path / "in" / "bomb.nii.gz") if (tmp_path / "in").mkdir() is None \
        else None
    t0 = time.perf_counter()
    r = _segmote("ingest", str(tmp_path / "in"), str(tmp_path / "c.zarr"))
    assert r.returncode == 1 and time.perf_counter() - t0 < 60
    assert f"FAILED bomb: {bomb}" in r.stdout and "--max-slice-mb" in r.stdout


# ------------------------------------------------------------ one writer per cohort
def test_second_ingest_is_refused_naming_the_holder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _nifti(src / "a.nii.gz", ct_volume((3, 16, 16))[0].transpose(2, 1, 0))
    cohort = tmp_path / "c.zarr"
    with StoreLock(cohort, "segmote ingest"):
        r = _segmote("ingest", str(src), str(cohort))
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr, r.stderr
    assert not cohort.exists()
    r = _segmote("ingest", str(src), str(cohort))
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------ provenance
def test_ingest_refuses_to_replace_a_case_from_another_source(tmp_path):
    """`segmote ingest` into an existing cohort replaced case `a` with another folder's
    `a.nii.gz`, silently. Now that row fails naming both sources, unless --replace."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    v1, v2 = ct_volume((3, 16, 16), seed=1)[0], ct_volume((3, 16, 16), seed=2)[0]
    _nifti(one / "a.nii.gz", v1.transpose(2, 1, 0))
    _nifti(two / "a.nii.gz", v2.transpose(2, 1, 0))
    _nifti(two / "b.nii.gz", v2.transpose(2, 1, 0))
    cohort = tmp_path / "c.zarr"
    assert ingest(one, cohort).ok
    rep = ingest(two, cohort)
    assert [r.case_id for r in rep.failed] == ["a"]
    err = rep.failed[0].error
    assert str(one / "a.nii.gz") in err and str(two / "a.nii.gz") in err and "--replace" in err
    np.testing.assert_array_equal(open_cohort(cohort).case("a").image[...], v1)  # kept
    assert "b" in open_cohort(cohort).case_ids()
    stamp = open_cohort(cohort).case("a").attrs["write_stamp"]
    rep = ingest(two, cohort, replace=True)
    assert rep.ok and [r.case_id for r in rep.records if r.status == "ingested"] == ["a"]
    case = open_cohort(cohort).case("a")
    np.testing.assert_array_equal(case.image[...], v2)
    assert case.attrs["write_stamp"] != stamp  # each write of a case gets a new stamp
    r = _segmote("ingest", "--help")
    assert "--replace" in r.stdout


# ------------------------------------------------------------ case ids
def test_invalid_and_reserved_case_ids_fail_their_row_only(tmp_path):
    """A list-file row with case id `..` aborted the whole ingest; `report.parquet` as a case id
    crashed the batch at its end. Both now fail their own row; the others are ingested."""
    img = _nifti(tmp_path / "x.nii.gz", ct_volume((3, 16, 16))[0].transpose(2, 1, 0))
    listing = tmp_path / "list.csv"
    listing.write_text("image,case_id\n"
                       f"{img.name},..\n{img.name},report.parquet\n{img.name},review_queue.csv\n"
                       f"{img.name},ok_1\n{img.name},../escape\n")
    cohort = tmp_path / "c.zarr"
    rep = ingest(listing, cohort)
    assert {r.case_id for r in rep.failed} == {"..", "report.parquet", "review_queue.csv",
                                               "../escape"}
    assert all("case id" in r.error for r in rep.failed)
    assert open_cohort(cohort).case_ids() == ["ok_1"] and report_path(cohort).is_file()
    for name in ("Report.csv", "corrections", "x.lock"):  # also the reviewers' folder, locks
        with pytest.raises(ValueError, match="reserved"):
            write_case(cohort, name, np.zeros((4, 4), np.uint8))


# ------------------------------------------------------------ NaN slices
def test_one_all_nan_slice_is_accepted_and_a_nan_image_named_by_its_file(tmp_path):
    """docs/medical_io.md: partially NaN volumes are accepted. One all-NaN slice was refused,
    with the cohort (not the source file) named."""
    vol = ct_volume((4, 16, 16))[0].astype(np.float32)
    vol[2] = np.nan
    src = _nifti(tmp_path / "partly_nan.nii.gz", vol.transpose(2, 1, 0))
    cohort = tmp_path / "c.zarr"
    rep = ingest([src], cohort)
    assert rep.ok, rep.failed
    case = open_cohort(cohort).case("partly_nan")
    assert case.attrs["nonfinite_voxels"] == 256 and case.attrs["empty_slices"] == [2]
    create_cohort(tmp_path / "d.zarr")
    with pytest.raises(ImageReadError, match=r"^/src/nan\.png \(case .*d\.zarr/n\): all values"):
        write_case(tmp_path / "d.zarr", "n", np.full((8, 8), np.nan, np.float32),
                   source="/src/nan.png")


# ------------------------------------------------------------ malformed metadata
def test_malformed_cohort_metadata_is_named(tmp_path):
    cohort = tmp_path / "c.zarr"
    create_cohort(cohort)
    write_case(cohort, "a", np.zeros((2, 8, 8), np.int16))
    write_case(cohort, "b", np.zeros((2, 8, 8), np.int16))
    root = zarr.open_group(str(cohort), mode="r+")
    root["b"]["image"].attrs["spacing"] = "not a list"
    with pytest.raises(CohortError, match=r"c\.zarr/b.*spacing"):
        open_cohort(cohort).case("b")
    assert open_cohort(cohort).case("a").spacing == (1.0, 1.0, 1.0)
    root.attrs["segmote"] = "cohort"
    with pytest.raises(CohortError, match=r"c\.zarr.*segmote"):
        open_cohort(cohort)
    (cohort / "zarr.json").write_text("{ not json")
    with pytest.raises(CohortError, match=r"c\.zarr"):
        open_cohort(cohort)


def test_napari_reader_declines_malformed_zarr_and_skips_a_bad_case(tmp_path):
    """`napari_get_reader` raised on a folder with a malformed zarr.json (it must return None
    for what it cannot read), and one bad case made the cohort reader fail all cases."""
    from napari_segmote._reader import napari_get_reader, read_cohort

    for text in ("{ not json", '{"attributes": {"segmote": "cohort"}}', "[1, 2]",
                 '{"attributes": []}'):
        bad = tmp_path / f"bad{len(text)}.zarr"
        bad.mkdir()
        (bad / "zarr.json").write_text(text)
        assert napari_get_reader(str(bad)) is None, text
    cohort = tmp_path / "c.zarr"
    create_cohort(cohort)
    write_case(cohort, "a", np.zeros((2, 8, 8), np.int16))
    write_case(cohort, "b", np.zeros((2, 8, 8), np.int16))
    zarr.open_group(str(cohort), mode="r+")["b"]["image"].attrs["affine"] = [[1, 2]]
    layers = read_cohort(cohort)
    assert [kw["name"] for _, kw, _ in layers] == ["a"]
    with pytest.raises(CohortError, match=r"c\.zarr/b.*affine"):
        read_cohort(cohort / "b")
