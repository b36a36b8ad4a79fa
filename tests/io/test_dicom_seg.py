"""DICOM-SEG out: read back with highdicom/pydicom, every frame on its source slice."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # the dicom extra

from segmote_core.io import open_cohort, open_image
from segmote_core.io.dicom_seg import write_dicom_seg
from segmote_core.io.ingest import ingest
from tests.io.dicom_series import PATIENT, ct_phantom, oblique_iop, write_series

hd = pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from training.phantoms_ct import CT_CATEGORIES

    root = tmp_path_factory.mktemp("seg")
    hu, labels, spacing = ct_phantom(slices=10, size=48)
    s = write_series(root / "ct", hu, spacing=spacing, iop=oblique_iop())
    cats = {int(k): v for k, v in CT_CATEGORIES.items()}
    assert len(set(np.unique(labels).tolist()) - {0}) >= 3      # several segments to place
    return s, labels, cats


def check_seg(path, s, labels, cats):
    """Each frame references the source slice at its z and sits at its position; the
    segments rebuild ``labels`` exactly and carry the category names."""
    seg = hd.seg.segread(path)
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == s.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == s.series_uid
    assert seg.FrameOfReferenceUID == pydicom.dcmread(s.files[0]).FrameOfReferenceUID
    ipp = {uid: [float(v) for v in pydicom.dcmread(f).ImagePositionPatient]
           for uid, f in zip(s.sop_uids, s.files)}
    present = sorted(set(np.unique(labels).tolist()) - {0})
    by_number = {n: seg.get_segment_description(n) for n in seg.get_segment_numbers()}
    assert [d.segment_label for d in by_number.values()] == [cats[i] for i in present]
    label_of = {n: int(d.tracking_id.split()[-1]) for n, d in by_number.items()}
    rebuilt = np.zeros_like(labels)
    frames = 0
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = s.sop_uids.index(ref)
        np.testing.assert_allclose([float(v) for v in fg.PlanePositionSequence[0]
                                    .ImagePositionPatient], ipp[ref], atol=1e-4)
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        rebuilt[z][seg.pixel_array[i] > 0] = label_of[number]
        frames += 1
    np.testing.assert_array_equal(rebuilt, labels)
    # one frame per (non-empty slice, segment present in it)
    assert frames == sum(len(set(np.unique(labels[z]).tolist()) - {0})
                         for z in range(labels.shape[0]))
    for key in ("PatientID", "PatientName"):   # the SEG goes back to the patient's record
        assert str(seg.get(key)) == PATIENT[key]
    return seg


def test_seg_from_the_source_folder(tmp_path, series):
    s, labels, cats = series
    out = write_dicom_seg(labels, tmp_path / "out" / "case.seg.dcm", source=s.folder,
                          categories=cats)
    check_seg(out, s, labels, cats)
    assert not list((tmp_path / "out").glob(".*"))            # no temporary file left


def test_seg_from_kept_uids_of_an_ingested_case(tmp_path, series):
    s, labels, cats = series
    ingest(s.folder, tmp_path / "c.zarr", keep_uids=True)
    cohort = open_cohort(tmp_path / "c.zarr")
    case = cohort.case(cohort.case_ids()[0])
    out = write_dicom_seg(labels, tmp_path / "case.seg.dcm", source=case.attrs["dicom_uids"],
                          like=case.as_image(), categories=cats)
    seg = hd.seg.segread(out)
    assert str(seg.PatientName) == "" and str(seg.PatientID) == ""   # the cohort holds none
    ipp = {uid: [float(v) for v in pydicom.dcmread(f).ImagePositionPatient]
           for uid, f in zip(s.sop_uids, s.files)}
    for fg in seg.PerFrameFunctionalGroupsSequence:
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in fg.PlanePositionSequence[0]
                                    .ImagePositionPatient], ipp[ref], atol=1e-3)
    rebuilt = seg.get_pixels_by_source_instance(s.sop_uids, combine_segments=True,
                                                skip_overlap_checks=True)
    present = sorted(set(np.unique(labels).tolist()) - {0})
    np.testing.assert_array_equal(np.asarray(present + [0])[rebuilt.astype(int) - 1], labels)


def test_seg_onto_an_enhanced_multiframe_source(tmp_path, series):
    s, labels, cats = series
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in s.files[::-1]], series_instance_uid=hd.UID(),
        series_number=5, sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "enhanced.dcm")
    img = open_image(tmp_path / "mf")
    np.testing.assert_array_equal(np.asarray(img.data), s.values)
    out = write_dicom_seg(labels, tmp_path / "mf.seg.dcm", source=tmp_path / "mf",
                          categories=cats)
    seg = hd.seg.segread(out)
    positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in
                 mf.PerFrameFunctionalGroupsSequence]
    src_z = {tuple(np.round(np.asarray(p, float), 3)): z for z, p in
             enumerate(pydicom.dcmread(f).ImagePositionPatient for f in s.files)}
    rebuilt = np.zeros_like(labels)
    label_of = {n: int(seg.get_segment_description(n).tracking_id.split()[-1])
                for n in seg.get_segment_numbers()}
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) - 1
        z = src_z[tuple(np.round(np.asarray(positions[frame], float), 3))]
        rebuilt[z][seg.pixel_array[i] > 0] = label_of[
            int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
    np.testing.assert_array_equal(rebuilt, labels)


def test_bad_labels_are_named_errors(tmp_path, series):
    s, labels, cats = series
    with pytest.raises(ValueError, match="do not fit the source series"):
        write_dicom_seg(labels[:-1], tmp_path / "x.dcm", source=s.folder, categories=cats)
    with pytest.raises(ValueError, match="labels are empty"):
        write_dicom_seg(np.zeros_like(labels), tmp_path / "x.dcm", source=s.folder)
    with pytest.raises(ValueError, match="overwrite a source"):
        write_dicom_seg(labels, s.files[0], source=s.folder, categories=cats)
    assert not (tmp_path / "x.dcm").exists()


def test_invalid_source_attribute_is_not_quoted_in_the_error(tmp_path, series, caplog):
    s, labels, cats = series
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in s.files:
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = "1961-03-02-SECRET"           # not a DA value
        ds.save_as(bad / f.name)
    caplog.clear()
    with pytest.raises(ValueError, match="cannot be referenced by a SEG") as err:
        write_dicom_seg(labels, tmp_path / "x.dcm", source=bad, categories=cats)
    assert "1961" not in str(err.value) and "SECRET" not in caplog.text
    assert not (tmp_path / "x.dcm").exists()
