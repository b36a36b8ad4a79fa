"""The offline demo cohort (``segmote demo-data``): a labelled cohort (docs/formats.md),
deterministic
from a seed, written with :func:`segmote_core.io.create_cohort` / :func:`write_case`.

| dataset | cases (full / ``small``) | image | labels |
| --- | --- | --- | --- |
| ``mni_brain`` | 10 patients x 32-36 axial slices (2 x 3) | (Z, 192, 168) float32 MR_T1W | 1 grey, 2 white matter; auto ``brain`` |
| ``ct_phantom`` | 8 patients x 16 slices (1 x 3) | (Z, 192, 192) int16 HU, CT | 1 lung, 2 liver, 3 kidney, 4 spine |
| ``xray_lungs`` | 60 images (1) | (192, 192) uint8, XR | 1 lung; auto ``lung`` |
| ``derm_lesion`` | 60 images (1) | (192, 192, 3) uint8, DERM | 1 lesion; auto ``lesion`` |

Each case's random generator is ``default_rng([seed, dataset index, case index])``, so a case
does not depend on which other cases or datasets are written. See docs/demo_data.md.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from segmote_core.io import create_cohort, write_case
from segmote_core.progress import CancelToken, ProgressCallback, report

from .phantoms import skin_lesion, xray_chest
from .phantoms_brain import brain_patient, load_mni_template
from .phantoms_ct import CT_CATEGORIES, ct_volume

__all__ = ["DATASETS", "DemoCase", "demo_plan", "iter_demo_cases", "write_demo_cohort"]

log = logging.getLogger(__name__)

DATASETS = ("mni_brain", "ct_phantom", "xray_lungs", "derm_lesion")
_FULL = {"mni_brain": 10, "ct_phantom": 8, "xray_lungs": 60, "derm_lesion": 60}
_SMALL = {"mni_brain": 2, "ct_phantom": 1, "xray_lungs": 1, "derm_lesion": 1}
_ID_DIGITS = {"mni_brain": 2, "ct_phantom": 2, "xray_lungs": 3, "derm_lesion": 3}


@dataclass(frozen=True)
class DemoCase:
    """One generated case, ready for :func:`write_case`."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]
    modality: str
    attrs: dict[str, Any]

    @property
    def axes_hint(self) -> str:
        """``"ZYX"`` for volumes (their spacing has 3 entries), else ``"YX"`` / ``"YXC"``."""
        return "ZYX" if len(self.spacing) == 3 else ("YXC" if self.image.ndim == 3 else "YX")


def demo_plan(small: bool = False, datasets: Sequence[str] | None = None) -> dict[str, int]:
    """Cases per dataset. Raises ValueError naming an unknown dataset."""
    chosen = list(datasets) if datasets else list(DATASETS)
    unknown = [d for d in chosen if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown demo dataset(s) {unknown}; choose from {list(DATASETS)}")
    counts = _SMALL if small else _FULL
    return {d: counts[d] for d in DATASETS if d in chosen}


def _case_id(dataset: str, index: int) -> str:
    return f"{dataset}_{index:0{_ID_DIGITS[dataset]}d}"


def _rng(seed: int, dataset: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), DATASETS.index(dataset), int(index)])


def _brain_cases(n: int, seed: int, small: bool,
                 skip: set[str] | frozenset[str]) -> Iterator[DemoCase | None]:
    template = load_mni_template()
    for i in range(n):
        if _case_id("mni_brain", i) in skip:
            yield None
            continue
        p = brain_patient(template, _rng(seed, "mni_brain", i), max_slices=3 if small else None)
        yield DemoCase(_case_id("mni_brain", i), p.image, p.labels, p.spacing, "MR_T1W", {
            "dataset": "mni_brain", "categories": {"1": "grey_matter", "2": "white_matter"},
            "auto_category": "brain", "patient": f"mni_P{i:02d}",
            "source": "nilearn MNI ICBM152 2009a template (T1, GM, WM), randomly warped",
            "template_z": p.template_z.tolist(), "synthesis": p.params})


def _ct_cases(n: int, seed: int, small: bool,
              skip: set[str] | frozenset[str]) -> Iterator[DemoCase | None]:
    for i in range(n):
        if _case_id("ct_phantom", i) in skip:
            yield None
            continue
        image, labels, spacing = ct_volume(_rng(seed, "ct_phantom", i), slices=3 if small else 16)
        yield DemoCase(_case_id("ct_phantom", i), image, labels, spacing, "CT", {
            "dataset": "ct_phantom", "categories": dict(CT_CATEGORIES), "patient": f"ct_P{i:02d}",
            "source": "generated CT phantom (Hounsfield units)"})


def _xray_cases(n: int, seed: int, small: bool,
                skip: set[str] | frozenset[str]) -> Iterator[DemoCase | None]:
    for i in range(n):
        if _case_id("xray_lungs", i) in skip:
            yield None
            continue
        image, labels = xray_chest(_rng(seed, "xray_lungs", i))
        yield DemoCase(_case_id("xray_lungs", i), image, labels, (0.7, 0.7), "XR", {
            "dataset": "xray_lungs", "categories": {"1": "lung"}, "auto_category": "lung",
            "patient": f"xr_P{i:03d}", "source": "generated chest X-ray phantom"})


def _derm_cases(n: int, seed: int, small: bool,
                skip: set[str] | frozenset[str]) -> Iterator[DemoCase | None]:
    for i in range(n):
        if _case_id("derm_lesion", i) in skip:
            yield None
            continue
        image, labels = skin_lesion(_rng(seed, "derm_lesion", i))
        yield DemoCase(_case_id("derm_lesion", i), image, labels, (0.05, 0.05), "DERM", {
            "dataset": "derm_lesion", "categories": {"1": "lesion"}, "auto_category": "lesion",
            "patient": f"derm_P{i:03d}", "source": "generated dermoscopy-like phantom"})


_MAKERS: dict[str, Callable[[int, int, bool], Iterator[DemoCase]]] = {
    "mni_brain": _brain_cases, "ct_phantom": _ct_cases,
    "xray_lungs": _xray_cases, "derm_lesion": _derm_cases}


def iter_demo_cases(*, small: bool = False, seed: int = 0, datasets: Sequence[str] | None = None,
                    skip: set[str] | frozenset[str] = frozenset()) -> Iterator[DemoCase | None]:
    """Generate the demo cases one at a time (in memory; nothing is written).

    Cases whose id is in ``skip`` are not generated: ``None`` stands in their place (so a
    resumed run keeps its progress count). A dataset whose cases are all skipped is not touched.
    """
    for dataset, n in demo_plan(small, datasets).items():
        ids = [_case_id(dataset, i) for i in range(n)]
        if all(c in skip for c in ids):
            yield from (None for _ in ids)
            continue
        for case in _MAKERS[dataset](n, seed, small, skip):
            yield case


def write_demo_cohort(out: str | Path, *, small: bool = False, seed: int = 0,
                      datasets: Sequence[str] | None = None, overwrite: bool = False,
                      progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None) -> dict[str, Any]:
    """Write the demo cohort to ``out`` (a zarr directory), or finish an interrupted one.

    Args:
        small: 5 small cases (2 brain patients x 3 slices, 1 CT x 3 slices, 1 X-ray, 1 skin).
        seed: every case is a deterministic function of (seed, dataset, case index).
        datasets: a subset of :data:`DATASETS` (default: all).
        overwrite: replace an existing ``out``. Otherwise an existing demo cohort written with
            the same parameters is resumed (complete cases are kept, the rest written: a rerun
            of a finished run writes nothing) and anything else raises.
        progress: ``progress(done_cases, total_cases)``; ``cancel`` stops between cases.
    Returns:
        Summary dict: ``cases``, ``written`` (this run), ``per_dataset`` counts, ``slices``
        (written this run), ``seconds``, ``path``.
    Raises:
        FileExistsError: ``out`` exists, is not a demo cohort of the same parameters, and
            ``overwrite`` is false.
        FileNotFoundError: the nilearn template files are missing (brain dataset).
    """
    import zarr

    out = Path(out)
    plan = demo_plan(small, datasets)
    params = {"seed": int(seed), "small": bool(small), "datasets": plan}
    done_ids: set[str] = set()
    if out.exists():
        if overwrite:
            shutil.rmtree(out)
        else:
            done_ids = _resumable(out, params)
    t0 = time.perf_counter()
    create_cohort(out)
    zarr.open_group(str(out), mode="r+").attrs.update({"demo": params})
    total = sum(plan.values())
    slices = written = 0
    for done, case in enumerate(iter_demo_cases(small=small, seed=seed, datasets=list(plan),
                                                skip=done_ids), 1):
        if case is not None:
            write_case(out, case.case_id, case.image, spacing=case.spacing,
                       modality=case.modality, labels=case.labels, attrs=case.attrs,
                       axes="YXC" if case.image.ndim == 3 and case.image.shape[-1] == 3 else None)
            written += 1
            slices += case.image.shape[0] if case.axes_hint == "ZYX" else 1
        report(progress, done, total, cancel)
    seconds = time.perf_counter() - t0
    log.info("demo cohort %s: %d cases written (%d already there), %d slices in %.1f s", out,
             written, total - written, slices, seconds)
    return {"path": str(out), "cases": total, "written": written, "per_dataset": plan,
            "slices": slices, "seconds": round(seconds, 2)}


def _resumable(out: Path, params: dict[str, Any]) -> set[str]:
    """Complete case ids of an earlier (maybe interrupted) run with the same parameters.

    Raises:
        FileExistsError: ``out`` holds something else (another seed or size, not a cohort).
    """
    from segmote_core.io import open_cohort

    hint = "choose a new path or pass overwrite=True (--overwrite)"
    try:
        coh = open_cohort(out)
    except (ValueError, OSError) as exc:
        raise FileExistsError(f"{out} exists and is not a cohort ({exc}); {hint}") from exc
    earlier = dict(coh.root.attrs).get("demo")
    if earlier != params and not (earlier is None and not coh.case_ids(include_incomplete=True)):
        raise FileExistsError(f"{out} exists with other demo parameters ({earlier}, asked "
                              f"{params}); {hint}")
    done = set(coh.case_ids())
    log.info("%s: resuming; %d complete case(s) kept", out, len(done))
    return done
