"""The offline demo cohort: `segmote demo-data` writes a valid labelled cohort, the
brain labels are the nilearn ICBM152 grey/white-matter maps, the phantoms have the intensities
they claim, and everything is a deterministic function of the seed.

Real files on disk (tmp_path, the nilearn wheel's NIfTI files); no mocks.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest
import zarr

from segmote_core.cli import main as segmote_main
from segmote_core.io import open_cohort
from training.demo_data import DATASETS, demo_plan, iter_demo_cases
from training.phantoms import skin_lesion, xray_chest
from training.phantoms_brain import CROP_X, CROP_Y, brain_patient, load_mni_template
from training.phantoms_ct import ct_volume

SEED = 3
SMALL_IDS = {"mni_brain_00", "mni_brain_01", "ct_phantom_00", "xray_lungs_000", "derm_lesion_000"}


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo.zarr"
    assert segmote_main(["demo-data", str(out), "--small", "--seed", str(SEED)]) == 0
    return out


@pytest.fixture(scope="module")
def template():
    return load_mni_template()


def _nilearn_map(name: str) -> np.ndarray:
    """A map read straight from the installed nilearn wheel, (x, y, z) in [0, 1]."""
    path = Path(nilearn.__file__).parent / "datasets" / "data" / \
        f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32) / 255.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_small_cohort_is_a_valid_labelled_cohort(small_cohort):
    coh = open_cohort(small_cohort)
    assert set(coh.case_ids()) == SMALL_IDS
    root = dict(zarr.open_group(str(small_cohort), mode="r").attrs)
    assert root["segmote"] == {"kind": "cohort", "version": 1}
    assert root["demo"]["seed"] == SEED and root["demo"]["small"] is True
    expect = {  # dataset: (axes, spatial shape, dtype, modality, label ids, auto_category)
        "mni_brain": ("ZYX", (192, 168), np.float32, "MR_T1W", {0, 1, 2}, "brain"),
        "ct_phantom": ("ZYX", (192, 192), np.int16, "CT", {0, 1, 2, 3, 4}, None),
        "xray_lungs": ("YX", (192, 192), np.uint8, "XR", {0, 1}, "lung"),
        "derm_lesion": ("YXC", (192, 192), np.uint8, "DERM", {0, 1}, "lesion"),
    }
    patients = set()
    for cid in coh.case_ids():
        case = coh.case(cid)
        dataset = case.attrs["dataset"]
        axes, spatial, dtype, modality, ids, auto = expect[dataset]
        assert cid.startswith(dataset)
        assert case.axes == axes and case.modality == modality
        assert case.image.dtype == dtype and case.labels.dtype == np.uint8
        shape = tuple(case.image.shape)
        assert (shape[1:] if axes == "ZYX" else shape[:2]) == spatial
        if axes == "YXC":
            assert shape[2] == 3
        labels = np.asarray(case.labels[...])
        assert labels.shape == (shape if axes == "ZYX" else shape[:2])
        assert set(np.unique(labels).tolist()) == ids              # every organ is present
        assert set(case.attrs["categories"]) == {str(i) for i in ids - {0}}
        assert case.attrs.get("auto_category") == auto
        assert case.attrs["complete"] is True
        patients.add(case.attrs["patient"])
        if axes == "ZYX":
            assert len(case.spacing) == 3 and all(s > 0 for s in case.spacing)
    assert len(patients) == len(SMALL_IDS)                          # one patient per case
    brain = coh.case("mni_brain_00")
    assert brain.image.shape[0] == 3
    assert brain.attrs["categories"] == {"1": "grey_matter", "2": "white_matter"}
    for z in range(3):                                              # slices with brain only
        lab = np.asarray(brain.labels[z])
        assert (lab == 1).sum() > 1500 and (lab == 2).sum() > 1500
    # another seed into the existing cohort is refused (error or non-zero exit), data untouched
    before = np.asarray(coh.case("xray_lungs_000").image[...])
    try:
        code = segmote_main(["demo-data", str(small_cohort), "--small", "--seed", str(SEED + 1)])
    except FileExistsError:
        code = 2
    assert code != 0
    np.testing.assert_array_equal(np.asarray(open_cohort(small_cohort).case(
        "xray_lungs_000").image[...]), before)


def test_written_cohort_is_deterministic_from_the_seed(small_cohort):
    coh = open_cohort(small_cohort)
    again = {c.case_id: c for c in iter_demo_cases(small=True, seed=SEED)}
    assert set(again) == SMALL_IDS
    for cid, case in again.items():
        stored = coh.case(cid)
        np.testing.assert_array_equal(np.asarray(stored.image[...]), case.image)
        np.testing.assert_array_equal(np.asarray(stored.labels[...]), case.labels)
    # a case depends only on (seed, dataset, index): generating one dataset alone gives the same
    alone = next(iter_demo_cases(small=True, seed=SEED, datasets=["xray_lungs"]))
    np.testing.assert_array_equal(alone.image, again["xray_lungs_000"].image)
    other = {c.case_id: c for c in iter_demo_cases(small=True, seed=SEED + 1)}
    for cid in SMALL_IDS:
        assert not np.array_equal(other[cid].image, again[cid].image)
        assert not np.array_equal(other[cid].labels, again[cid].labels)


def test_plan_sizes_and_unknown_dataset():
    full = demo_plan()
    assert tuple(full) == DATASETS
    assert full["mni_brain"] >= 10 and full["ct_phantom"] >= 8      # 9:1 patient split possible
    assert full["xray_lungs"] >= 50 and full["derm_lesion"] >= 50
    assert demo_plan(small=True, datasets=["ct_phantom"]) == {"ct_phantom": 1}
    with pytest.raises(ValueError, match="bogus"):
        demo_plan(datasets=["bogus"])


def test_brain_labels_are_the_nilearn_grey_white_matter_maps(template):
    gm, wm, t1 = _nilearn_map("gm"), _nilearn_map("wm"), _nilearn_map("t1")
    xs = np.arange(*CROP_X)
    ys = np.arange(CROP_Y[1] - 1, CROP_Y[0] - 1, -1)               # anterior at the top

    def ref(vol: np.ndarray, z: int) -> np.ndarray:               # (Y, X) of template slice z
        return vol[np.ix_(xs, ys, [z])][..., 0].T

    # strength 0: no warp, no bias, no noise -> exactly the argmax of (bg, GM, WM) of nilearn
    plain = brain_patient(template, np.random.default_rng(0), strength=0.0, max_slices=4)
    assert plain.image.shape == (4, 192, 168)
    for k, z in enumerate(plain.template_z):
        g, w = ref(gm, int(z)), ref(wm, int(z))
        want = np.where((g >= w) & (g >= 1 - g - w), 1, 0)
        want = np.where((w > g) & (w >= 1 - g - w), 2, want)
        assert np.mean(plain.labels[k] == want) > 0.999
        np.testing.assert_allclose(plain.image[k], 1000.0 * ref(t1, int(z)), rtol=1e-5, atol=1e-3)
    # a real patient: warped (not the template), but still overlapping it, with T1 contrast
    p = brain_patient(template, np.random.default_rng([SEED, 0, 0]), max_slices=6)
    dice_gm, dice_wm, prob_gm, prob_wm = [], [], [], []
    for k, z in enumerate(p.template_z):
        g, w = ref(gm, int(z)), ref(wm, int(z))
        dice_gm.append(_dice(p.labels[k] == 1, (g > w) & (g > 0.3)))
        dice_wm.append(_dice(p.labels[k] == 2, (w > g) & (w > 0.3)))
        prob_gm.append(g[p.labels[k] == 1].mean() - w[p.labels[k] == 1].mean())
        prob_wm.append(w[p.labels[k] == 2].mean() - g[p.labels[k] == 2].mean())
    assert 0.4 < np.mean(dice_gm) < 0.97 and 0.4 < np.mean(dice_wm) < 0.97
    assert np.mean(prob_gm) > 0.1 and np.mean(prob_wm) > 0.1      # labels follow the maps
    img, lab = p.image, p.labels
    assert img[lab == 2].mean() > img[lab == 1].mean() > 5 * img[lab == 0].mean()   # T1: WM > GM


def test_ct_phantom_is_in_hounsfield_units():
    image, labels, spacing = ct_volume(np.random.default_rng(11), slices=12)
    assert image.shape == labels.shape == (12, 192, 192) and image.dtype == np.int16
    assert spacing[0] == 5.0
    med = {i: float(np.median(image[labels == i])) for i in range(1, 5)}
    assert -900 < med[1] < -700                                      # lung
    assert 35 < med[2] < 85                                          # liver
    assert 5 < med[3] < 55                                           # kidney
    assert med[4] > 550                                              # bone
    assert np.median(image[:, :8, :8]) < -950                        # air outside the body
    fat = (image > -160) & (image < -60) & (labels == 0)
    soft = (image > 10) & (image < 70) & (labels == 0)
    assert fat.mean() > 0.01 and soft.mean() > 0.1
    lung_area = (labels == 1).sum(axis=(1, 2))
    kidney_area = (labels == 3).sum(axis=(1, 2))
    assert lung_area[:3].min() > 1000 and lung_area[-1] == 0          # thorax at the top
    assert kidney_area[0] == 0 and kidney_area[-1] > 200             # kidneys lower down
    assert ((labels == 4).sum(axis=(1, 2)) > 100).all()              # spine on every slice
    other, other_labels, _ = ct_volume(np.random.default_rng(12), slices=12)
    assert _dice(labels == 2, other_labels == 2) < 0.95              # patients differ


def test_xray_and_skin_phantoms_vary_and_show_their_label():
    lesion_area, lesion_cx, lung_area = [], [], []
    for i in range(8):
        image, lab = xray_chest(np.random.default_rng([1, i]))
        assert image.shape == lab.shape == (192, 192) and image.dtype == np.uint8
        body = (image > 40) | (lab == 1)
        assert image[lab == 1].mean() < image[body & (lab == 0)].mean() - 20   # lungs are dark
        assert image.std() > 20
        lung_area.append(int(lab.sum()))
        rgb, les = skin_lesion(np.random.default_rng([2, i]))
        assert rgb.shape == (192, 192, 3) and les.shape == (192, 192)
        luma = rgb.astype(float) @ [0.299, 0.587, 0.114]
        ring = np.zeros_like(les, bool)
        ys, xs = np.nonzero(les)
        lesion_area.append(les.sum())
        lesion_cx.append(xs.mean())
        pad = 12
        ring[max(ys.min() - pad, 0):ys.max() + pad, max(xs.min() - pad, 0):xs.max() + pad] = True
        assert luma[les == 1].mean() < luma[ring & (les == 0)].mean() - 15      # lesion darker
    for values in (lesion_area, lesion_cx, lung_area):
        assert np.std(values) / np.mean(values) > 0.04                # shapes and positions vary
    assert np.std(lesion_area) / np.mean(lesion_area) > 0.2
