"""A real CT slice in napari, in the order a user clicks: the default model follows a box.

    xvfb-run -a python scripts/napari_real_ct_screenshot.py [FILE [Y0,X0,Y1,X1 [OUT.png]]]

Opens one of pydicom's bundled real slices (default ``CT_small.dcm``) with the plugin's reader in
a shown viewer, docks the SegMoTE annotator, loads the bundled demo model (the default, on
LiteMedSAM), starts annotating and drags one box (pixels; default the left paraspinal muscles,
where the tiny from-scratch model drew speckle over the whole slice). Prints a JSON report (mask
pixels, the share of the mask inside the box, as the real-image check counts it) and saves a
screenshot (default ``docs/screenshots/napari_real_ct_box.png``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from napari_user_order_screenshot import _wait   # the sibling script's event-loop wait

PARASPINAL = "72,12,108,56"


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "CT_small.dcm"
    y0, x0, y1, x1 = (float(v) for v in (argv[1] if len(argv) > 1 else PARASPINAL).split(","))
    out = Path(argv[2] if len(argv) > 2 else "docs/screenshots/napari_real_ct_box.png")

    import napari
    from napari.qt import get_qapp

    viewer = napari.Viewer(show=True)        # the viewer first, as a user starts napari
    viewer.window.resize(1400, 820)
    app = get_qapp()
    app.processEvents()
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    viewer.open(path, plugin="segmote")
    app.processEvents()
    _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")

    import numpy as np

    from napari_segmote._models import DEMO
    from napari_segmote.layers import BOXES, CURRENT
    from training.real_image_check import inside_fraction

    widget.source.value = DEMO
    widget.load_model()
    _wait(app, lambda: widget._loader is None, 180, "the demo model")
    report = {"file": Path(path).name, "layers": [layer.name for layer in viewer.layers],
              "image_choice": getattr(widget.image.value, "name", None),
              "model_status": str(widget.status.value)}
    widget.start()
    c = widget.controller
    report["image_shape"] = list(c.image_layer.data.shape)
    rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)
    if c.image_layer.ndim == 3:                       # a one-slice volume: the box on slice 0
        rect = np.concatenate([np.zeros((4, 1)), rect], 1)
    c.layers[BOXES].add_rectangles([rect])
    _wait(app, lambda: c.worker is None, 180, "the box prompt's mask")
    for _ in range(30):                               # let the canvas draw the new mask
        app.processEvents()
        time.sleep(0.02)
    mask = np.asarray(c.layers[CURRENT].data) > 0
    on = mask[0] if mask.ndim == 3 else mask
    report.update(mask_pixels=int(on.sum()),
                  inside_fraction=inside_fraction(on, np.array([x0, y0, x1, y1])),
                  box_area=int((y1 - y0 + 1) * (x1 - x0 + 1)), status=str(widget.status.value))
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print(json.dumps(report, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
