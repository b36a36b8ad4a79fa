"""A real CT slice in napari, in the order a user clicks: the default model follows a box.

    xvfb-run -a python scripts/napari_real_ct_screenshot.py [FILE BOX OUT.png]

Opens one of pydicom's bundled real slices (default ``CT_small.dcm``) with the plugin's reader in
a shown viewer, docks the SegMoTE annotator, loads the bundled demo model (the default, on
LiteMedSAM), starts annotating and drags one box (``BOX`` = y0,x0,y1,x1 in pixels; default the
left paraspinal muscles, where the tiny from-scratch model drew speckle over the whole slice).
Prints a JSON report (mask pixels, the share of the mask inside the box) and saves a screenshot
(default ``docs/screenshots/napari_real_ct_box.png``).
"""
import json, sys, time
from pathlib import Path

def wait(app, cond, t, what):
    s = time.monotonic()
    while not cond():
        app.processEvents(); time.sleep(0.02)
        if time.monotonic() - s > t: raise TimeoutError(what)

import napari
from napari.qt import get_qapp
viewer = napari.Viewer(show=True)
viewer.window.resize(1400, 820)
app = get_qapp(); app.processEvents()
from pydicom.data import get_testdata_file
path = get_testdata_file(sys.argv[1] if len(sys.argv) > 1 else "CT_small.dcm")
layers = viewer.open(path, plugin="segmote")
app.processEvents()
_, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
from napari_segmote._models import DEMO
from napari_segmote.layers import BOXES, CURRENT
import numpy as np
widget.source.value = DEMO
widget.load_model()
wait(app, lambda: widget._loader is None, 180, "model")
report = {"file": Path(path).name, "layers": [l.name for l in viewer.layers],
          "image_choice": getattr(widget.image.value, "name", None), "model_status": str(widget.status.value)}
widget.start()
c = widget.controller
img = np.asarray(c.image_layer.data)
report["image_shape"] = list(img.shape)
box = [float(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "72,12,108,56").split(",")]
y0, x0, y1, x1 = box
nd = c.image_layer.ndim
rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)
if nd == 3:
    rect = np.concatenate([np.zeros((4, 1)), rect], 1)
c.layers[BOXES].add_rectangles([rect])
wait(app, lambda: c.worker is None, 180, "mask")
for _ in range(30): app.processEvents(); time.sleep(0.02)
mask = np.asarray(c.layers[CURRENT].data) > 0
m = mask[0] if mask.ndim == 3 else mask
inside = m[int(y0):int(y1) + 1, int(x0):int(x1) + 1].sum()
report.update(mask_pixels=int(m.sum()), inside_fraction=float(inside / max(m.sum(), 1)),
              box_area=int((y1 - y0 + 1) * (x1 - x0 + 1)), status=str(widget.status.value))
out = Path(sys.argv[3] if len(sys.argv) > 3 else "docs/screenshots/napari_real_ct_box.png")
viewer.screenshot(str(out), canvas_only=False)
print(json.dumps(report, indent=1))
viewer.close()
