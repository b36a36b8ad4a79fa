"""The plugin's layers: their names (public: scripts and tests find the layers by them) and
the viewer-side helpers that create and update them, read the current slice and layer metadata.

Every layer the plugin adds shares the image layer's scale, translate and axis labels, so
their data coordinates are the image's pixel indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["POINTS", "BOXES", "CURRENT", "COMMITTED", "HEATMAP", "POSITIVE", "NEGATIVE",
           "redraw_changed",
           "current_slice", "step_slice", "geometry", "ensure_layers", "show_heatmap",
           "segmote_meta"]

POINTS = "SegMoTE points"
BOXES = "SegMoTE boxes"
CURRENT = "SegMoTE current object"
COMMITTED = "SegMoTE committed objects"
HEATMAP = "SegMoTE routing heat map"
POSITIVE, NEGATIVE = "lime", "red"


def geometry(layer: Any) -> dict[str, Any]:
    """The scale/translate/axis-label keyword arguments that align a new layer with ``layer``."""
    return {"scale": tuple(layer.scale), "translate": tuple(layer.translate),
            "axis_labels": tuple(layer.axis_labels)}


def segmote_meta(layer: Any) -> dict[str, Any]:
    """The ``segmote`` entry of a layer's metadata (modality, spacing, affine, source)."""
    return dict(layer.metadata.get("segmote", {}))


def current_slice(viewer: Any, layer: Any) -> int | None:
    """The slice of ``layer`` the viewer shows (``None`` for 2D and RGB images)."""
    if layer.ndim != 3:
        return None
    z = int(np.round(layer.world_to_data(viewer.dims.point)[0]))
    return int(np.clip(z, 0, layer.data.shape[0] - 1))


def step_slice(viewer: Any, layer: Any, step: int) -> int | None:
    """Move the viewer ``step`` slices along ``layer``'s first axis; returns the new slice."""
    z = current_slice(viewer, layer)
    if z is None:
        return None
    z = int(np.clip(z + step, 0, layer.data.shape[0] - 1))
    axis = viewer.dims.ndim - layer.ndim
    viewer.dims.set_point(axis, layer.translate[0] + z * layer.scale[0])
    return z


def _get_or_add(viewer: Any, name: str, kind: str, data: Any, **kwargs: Any) -> Any:
    if name in viewer.layers:
        viewer.layers.remove(name)
    return getattr(viewer, f"add_{kind}")(data, name=name, **kwargs)


def ensure_layers(viewer: Any, image_layer: Any, current: np.ndarray, committed: np.ndarray
                  ) -> dict[str, Any]:
    """(Re)create the prompt and label layers for one annotation session; returns them by name."""
    ndim = current.ndim
    geo = geometry(image_layer)
    meta = {"segmote": segmote_meta(image_layer)}
    layers = {
        COMMITTED: _get_or_add(viewer, COMMITTED, "labels", committed, metadata=meta, **geo),
        CURRENT: _get_or_add(viewer, CURRENT, "labels", current, opacity=0.6, metadata=meta,
                             **geo),
        BOXES: _get_or_add(viewer, BOXES, "shapes", None, ndim=ndim, shape_type="rectangle",
                           edge_color="yellow", face_color="transparent", edge_width=1.5, **geo),
        POINTS: _get_or_add(viewer, POINTS, "points", np.empty((0, ndim)), ndim=ndim,
                            features={"positive": np.zeros(0, dtype=bool)},
                            face_color=POSITIVE, size=max(3.0, 0.02 * max(current.shape[-2:])),
                            **geo),
    }
    points = layers[POINTS]
    points.feature_defaults = {"positive": True}
    points.current_face_color = POSITIVE
    layers[CURRENT].colormap = _single_colour()
    viewer.layers.selection.active = points
    points.mode = "add"
    return layers


def _single_colour() -> Any:
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "cyan"})


def redraw_changed(layer: Any, data: np.ndarray, before: np.ndarray, z: int | None) -> None:
    """Redraw only the pixels of plane ``z`` of ``data`` that changed since ``before``.

    ``data`` (already updated) is the layer's array; ``z`` is ``None`` for a 2D image. The change
    goes through ``Labels.data_setitem``, napari's own painting path: it redraws only the
    changed box (``refresh`` re-slices and re-uploads the whole plane) and lands in the layer's
    undo history. Falls back to ``refresh`` when the layer holds another array.
    """
    if layer.data is not data:
        layer.refresh()
        return
    plane = data if z is None else data[z]
    ys, xs = np.nonzero(before != plane)
    if ys.size == 0:
        return
    values = plane[ys, xs]
    plane[ys, xs] = before[ys, xs]  # data_setitem finds the change by comparing with these
    index = (ys, xs) if z is None else (np.full_like(ys, z), ys, xs)
    layer.data_setitem(index, values)


def show_heatmap(viewer: Any, image_layer: Any, heat: np.ndarray, z: int | None) -> Any:
    """Show a ``(Y, X)`` heat map on slice ``z`` (all of a 2D image) as an Image layer."""
    geo = geometry(image_layer)
    data = heat.astype(np.float32)
    if z is not None:
        data = data[None]
        translate = list(geo["translate"])
        translate[0] += z * geo["scale"][0]
        geo["translate"] = tuple(translate)
    if HEATMAP in viewer.layers:
        layer = viewer.layers[HEATMAP]
        layer.data = data
        layer.translate = geo["translate"]
        return layer
    return viewer.add_image(data, name=HEATMAP, colormap="inferno", opacity=0.5,
                            blending="additive", **geo)
