"""Screenshots of the SegMoTE napari widget in use, for docs/napari.md and the README.

Opens the plugin's sample data in a real napari window (under a virtual X display when there
is none), prompts with points and a box, commits objects, shows the routing heat map and a
PPT auto segmentation, and saves window screenshots to ``docs/screenshots/``.

    python scripts/napari_screenshots.py [--out docs/screenshots] [--random-model | --checkpoint F]

``--random-model`` uses random tiny weights (masks are then meaningless) when the bundled
demo model is absent.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("napari_screenshots")


def _display():
    if os.environ.get("DISPLAY"):
        return None
    from pyvirtualdisplay import Display

    return Display(visible=False, size=(1600, 1000)).start()


def _wait(app, controller, timeout_s: float = 120.0) -> None:
    import time

    t0 = time.time()
    while controller.worker is not None and time.time() - t0 < timeout_s:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):
        app.processEvents()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs"
                    / "screenshots")
    ap.add_argument("--random-model", action="store_true")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="SegMoTE .safetensors to use instead of the bundled demo model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    args.out.mkdir(parents=True, exist_ok=True)
    display = _display()

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from segmote_core import SegMoTEConfig, build_segmote, load_demo_model, load_segmote
    from segmote_core.sample_images import make_ct_phantom
    from napari_segmote.layers import BOXES, HEATMAP, POINTS

    torch.set_num_threads(2)
    if args.random_model:
        torch.manual_seed(0)
        model = build_segmote(SegMoTEConfig(model_type="tiny"))
    elif args.checkpoint is not None:
        model = load_segmote(args.checkpoint)
    else:
        model = load_demo_model()
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("segmote", "ct_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    c = widget.controller
    c.set_model(model)
    widget.image.value = viewer.layers["CT phantom"]
    widget.modality.value = "CT"
    widget.start()
    _, ref, spacing = make_ct_phantom()

    def centre(label: int, z: int) -> list[float]:
        ys, xs = np.nonzero(ref[z] == label)
        return [z, float(ys.mean()), float(xs.mean())]

    z = 12
    viewer.dims.set_point(0, z * spacing[0])
    widget.embed_volume_button.clicked.emit()
    _wait(app, c)
    def category(name: str) -> None:  # the text guide, when the model knows the category
        widget.category.value = name if name in c.categories() else None

    # 1: a positive point on the liver, a negative one outside, the category "liver", the mask
    category("liver")
    c.layers[POINTS].add([centre(3, z)])
    widget.negative.value = True
    c.layers[POINTS].add([[z, 20.0, 64.0]])
    widget.negative.value = False
    _wait(app, c)
    viewer.screenshot(str(args.out / "napari_point_prompt.png"), canvas_only=False, flash=False)
    widget.commit_button.clicked.emit()
    # 2: a box around the left lung ("lung"), with the routing heat map of the selected expert
    widget.heatmap.value = True
    category("lung")
    ys, xs = np.nonzero(ref[z] == 1)
    y0, y1, x0, x1 = ys.min() - 2, ys.max() + 2, xs.min() - 2, xs.max() + 2
    c.layers[BOXES].add_rectangles([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]])
    _wait(app, c)
    viewer.screenshot(str(args.out / "napari_box_heatmap.png"), canvas_only=False, flash=False)
    widget.commit_button.clicked.emit()
    category("")
    viewer.layers[HEATMAP].visible = False
    viewer.screenshot(str(args.out / "napari_committed.png"), canvas_only=False, flash=False)

    # 3: RGB dermoscopy, PPT auto mode without any prompt
    viewer.layers.clear()
    viewer.open_sample("segmote", "dermoscopy_phantom")
    widget.image.value = viewer.layers["Dermoscopy phantom"]
    widget.modality.value = "DERM"
    widget.start()
    widget.auto_slice_button.clicked.emit()
    _wait(app, c)
    viewer.screenshot(str(args.out / "napari_rgb_auto.png"), canvas_only=False, flash=False)
    log.info("screenshots written to %s", args.out)
    viewer.close()
    if display is not None:
        display.stop()


if __name__ == "__main__":
    main()
