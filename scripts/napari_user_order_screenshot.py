"""Open the SegMoTE annotator in the order a user's clicks produce, and take a screenshot.

Run in a fresh process (nothing may import torch before the viewer exists)::

    xvfb-run -a python scripts/napari_user_order_screenshot.py \
        --out docs/screenshots/napari_user_order_point.png --report /tmp/report.json

Steps, as a user does them: ``napari.Viewer(show=True)`` (the OpenGL context exists from here on)
-> File > Open Sample > SegMoTE CT phantom -> Plugins > SegMoTE annotator (the menu's QAction,
or with ``--via dock`` ``add_plugin_dock_widget``) -> "Load model" with the bundled demo model
-> "Start annotating" -> one positive point on the kidney of slice 12. The JSON report says
which slices hold the mask, its Dice against the clicked phantom structure and whether triton
was loaded (and from where), so tests can assert on values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SLICE = 12
KIDNEY = 5          # the default target; --label picks another phantom structure


def _wait(app, condition, timeout: float, what: str) -> None:
    start = time.monotonic()
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _plugins_menu_action(window, title: str):
    """The QAction of ``title`` under the menu bar's Plugins menu (what the user clicks)."""
    bar = window._qt_window.menuBar()
    for top in bar.actions():
        if top.text().replace("&", "") == "Plugins" and top.menu() is not None:
            stack = [top.menu()]
            while stack:
                menu = stack.pop()
                for action in menu.actions():
                    if action.menu() is not None:
                        stack.append(action.menu())
                    elif title in action.text().replace("&&", "&"):
                        return action
    raise LookupError(f"no {title!r} entry under the Plugins menu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="screenshot PNG (whole window with the dock)")
    parser.add_argument("--report", type=Path, help="JSON report of what happened")
    parser.add_argument("--via", choices=("menu", "dock"), default="menu")
    parser.add_argument("--label", type=int, default=KIDNEY,
                        help="phantom structure to click (1/2 lungs, 3 liver, 4 spine, 5 kidney)")
    parser.add_argument("--category", help="text guide chosen before the click (e.g. kidney)")
    args = parser.parse_args(argv)

    report: dict = {"torch_before_viewer": "torch" in sys.modules}
    import napari
    from napari.qt import get_qapp

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 820)
    app = get_qapp()
    app.processEvents()
    report["torch_before_plugin"] = "torch" in sys.modules
    viewer.open_sample("segmote", "ct_phantom")
    app.processEvents()

    if args.via == "menu":
        _plugins_menu_action(viewer.window, "SegMoTE annotator").trigger()
        app.processEvents()
        dock = viewer.window._wrapped_dock_widgets.get("SegMoTE annotator (SegMoTE)") or next(
            d for name, d in viewer.window._wrapped_dock_widgets.items() if "SegMoTE" in name)
        widget = dock.inner_widget()
    else:
        _, widget = viewer.window.add_plugin_dock_widget("segmote", "SegMoTE annotator")
    report["triton_loaded"] = "triton" in sys.modules and sys.modules["triton"] is not None

    from napari_segmote.layers import CURRENT, POINTS
    from napari_segmote._models import DEMO
    from segmote_core.sample_images import make_ct_phantom

    widget.source.value = DEMO
    widget.load_model()
    _wait(app, lambda: widget._loader is None, 120, "the demo model")
    if widget.controller.model is None:
        raise RuntimeError(f"the demo model did not load: {widget.status.value}")
    widget.image.value = viewer.layers["CT phantom"]
    widget.modality.value = "CT"
    widget.start()
    if args.category:
        widget.category.reset_choices()
        widget.category.value = args.category
    c = widget.controller
    image = c.image_layer
    z_world = image.translate[0] + SLICE * image.scale[0]
    viewer.dims.set_point(viewer.dims.ndim - image.ndim, z_world)
    app.processEvents()

    import numpy as np

    _, reference, _ = make_ct_phantom()
    target = reference[SLICE] == args.label
    ys, xs = np.nonzero(target)
    c.layers[POINTS].add([[SLICE, float(ys.mean()), float(xs.mean())]])
    _wait(app, lambda: c.worker is None, 180, "the point prompt's mask")
    for _ in range(20):                     # let the canvas draw the new mask
        app.processEvents()
        time.sleep(0.02)

    mask = np.asarray(c.layers[CURRENT].data) > 0
    on = mask[SLICE]
    report.update(
        slice=SLICE, current_slice=int(c.z),
        slices_with_mask=[int(z) for z in np.nonzero(mask.reshape(len(mask), -1).any(1))[0]],
        mask_pixels=int(on.sum()),
        label=args.label, category=args.category,
        clicked_pixel_in_mask=bool(on[round(ys.mean()), round(xs.mean())]),
        dice=float(2 * (on & target).sum() / max(on.sum() + target.sum(), 1)),
        recall=float((on & target).sum() / max(target.sum(), 1)),
        status=str(widget.status.value),
        triton_loaded_end="triton" in sys.modules and sys.modules["triton"] is not None,
        torch_loaded_end="torch" in sys.modules)
    libs = [line.split()[-1] for line in open("/proc/self/maps") if "libLLVM" in line
            or "libtriton" in line] if sys.platform.startswith("linux") else []
    report["llvm_libraries"] = sorted(set(libs))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.out), canvas_only=False)
        report["screenshot"] = str(args.out)
    text = json.dumps(report, indent=1)
    if args.report:
        args.report.write_text(text)
    print(text)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
