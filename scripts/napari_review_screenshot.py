"""Screenshot of the SegMoTE Review panel on a real overnight output, for docs/napari.md and the
README.

Writes a small demo cohort (seed 11, which the demo model never saw), puts a signal dropout band
over part of one brain slice (a bad slice for the queue to find), runs ``segmote batch`` on it
(bundled demo model, local Ray), then opens the output in napari, loads the review queue, opens
the first case (at its worst slice), saves it as reviewed, presses Next (the next pending case
opens at its worst slice) and takes a window screenshot.

    xvfb-run -a python scripts/napari_review_screenshot.py [--work /tmp/review_shot]
        [--out docs/screenshots/napari_review.png]
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger("napari_review_screenshot")


def make_output(work: Path) -> Path:
    """A demo cohort with one planted bad slice, segmented by segmote batch."""
    import zarr

    from pipeline import BatchOptions, run_batch
    from training.demo_data import write_demo_cohort

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cohort = work / "demo_cohort.zarr"
    write_demo_cohort(cohort, small=True, seed=11)
    image = zarr.open_array(str(cohort / "mni_brain_01" / "image"), mode="r+")
    labels = np.asarray(zarr.open_array(str(cohort / "mni_brain_01" / "labels"), mode="r")[1])
    ys, _ = np.nonzero(labels)
    band = np.asarray(image[1])
    band[ys.min():(ys.min() + ys.max()) // 2] = 0  # a dropout band over the top of the brain
    image[1] = band
    out = work / "demo_labels.zarr"
    summary = run_batch(BatchOptions(str(cohort), str(out), num_cpus=2, progress=False))
    log.info("batch: %d case(s), failed %s", len(summary.rows), summary.failed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/segmote_review_shot"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs"
                    / "screenshots" / "napari_review.png")
    ap.add_argument("--reuse", action="store_true", help="reuse the output in --work")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = args.work / "demo_labels.zarr" if args.reuse else make_output(args.work)
    if (out / "corrections").exists():
        shutil.rmtree(out / "corrections")

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE review")
    widget.load(out)
    widget.open_case(widget.entries[0].case)  # the lowest QC: it opens at its worst slice
    widget.save()                               # accepted as it is: reviewed
    entry = widget.next_slice()                 # the cohort's worst slice of a pending case
    log.info("next worst slice: %s slice %d (QC %.2f)", entry.case, entry.slice, entry.qc)
    for _ in range(30):
        QApplication.processEvents()
    viewer.reset_view()   # fit to the canvas as resized (the window was resized after creation)
    for _ in range(30):
        QApplication.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    log.info("queue: %s", [f"{e.rank} {e.case} {e.qc:.2f} {e.status}" for e in widget.entries])
    log.info("screenshot written to %s", args.out)
    viewer.close()


if __name__ == "__main__":
    main()
