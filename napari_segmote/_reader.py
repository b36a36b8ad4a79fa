"""npe2 reader: NIfTI images, DICOM series, SegMoTE cohort cases (zarr, docs/formats.md) and the
output of ``segmote batch`` (``OUT.zarr`` or one of its cases: the case's image from its cohort
with the pre-labels, or the saved correction, as an editable Labels layer) into napari layers.

Layers carry ``metadata["segmote"]`` = modality, spacing, affine and source, so the writer can
save labels with the source affine and the widget can pick the modality. Volumes stay lazy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from segmote_core.io import CohortError, open_cohort
from segmote_core.io.readers import image_format, open_image

__all__ = ["napari_get_reader", "read_nifti", "read_dicom", "read_cohort", "read_output",
           "output_case_layers", "image_layer_data"]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]
#: display window of CT images (soft tissue, HU).
CT_CONTRAST = (-160.0, 240.0)
#: names of the spatial axes of a (Z, Y, X) volume (2D images: the last two; RGB channels are
#: not a dims axis in napari).
SPATIAL_AXES = ("z", "y", "x")


def _zarr_kind(path: Path) -> str | None:
    """``"cohort"``, ``"case"`` or ``None`` from the zarr v3 metadata, without opening arrays."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
        seg = attrs.get("segmote", {})
        kind = seg.get("kind") if isinstance(seg, dict) else None
    except (OSError, ValueError, AttributeError):  # malformed metadata: not ours to read
        return None
    if kind == "cohort":
        return "cohort"
    if kind == "labels":
        return "output"
    if (path / "image").is_dir() and _zarr_kind(path.parent) == "cohort":
        return "case"
    if (path / "labels").is_dir() and _zarr_kind(path.parent) == "output":
        return "output_case"
    return None


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader for ``.nii``/``.nii.gz`` files and cohort zarr roots or cases."""
    paths = path if isinstance(path, list) else [path]
    if not paths:
        return None
    for p in paths:
        p = Path(str(p))
        if p.name.endswith((".nii", ".nii.gz")):
            continue
        if p.is_dir() and _zarr_kind(p) is not None:
            continue
        if image_format(p) == "dicom":  # a DICOM file (its series) or a folder of one series
            continue
        return None
    return read_paths


def read_paths(path: str | list[str]) -> list[LayerData]:
    paths = path if isinstance(path, list) else [path]
    layers: list[LayerData] = []
    for p in paths:
        p = Path(str(p))
        if p.name.endswith((".nii", ".nii.gz")):
            layers.extend(read_nifti(p))
        elif image_format(p) == "dicom":
            layers.extend(read_dicom(p))
        elif _zarr_kind(p) in ("output", "output_case"):
            layers.extend(read_output(p))
        else:
            layers.extend(read_cohort(p))
    return layers


def _meta(modality: str, spacing: Any, affine: Any, source: str, **extra: Any) -> dict:
    return {"segmote": {"modality": str(modality), "spacing": [float(s) for s in spacing],
                        "affine": np.asarray(affine, dtype=float).tolist(), "source": source,
                        **extra}}


def image_layer_data(data: Any, name: str, modality: str, spacing: Any, affine: Any,
                     source: str, rgb: bool = False, **extra: Any) -> LayerData:
    """The layer tuple of one image: scale from the spacing, CT window, segmote metadata."""
    ndim = len(data.shape) - int(rgb)
    spatial = list(spacing)[-ndim:] if len(spacing) >= ndim else [1.0] * ndim
    kwargs: dict[str, Any] = {"name": name, "scale": spatial, "rgb": rgb,
                              "metadata": _meta(modality, spatial, affine, source, **extra)}
    if ndim <= len(SPATIAL_AXES):  # napari's dims slider then says z/y/x, not -3/-2/-1
        kwargs["axis_labels"] = SPATIAL_AXES[-ndim:]
    if str(modality).upper() == "CT" and not rgb:
        kwargs["contrast_limits"] = CT_CONTRAST
    return data, kwargs, "image"


def read_nifti(path: Path) -> list[LayerData]:
    img = open_image(path)
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    return [image_layer_data(img.data, name, img.modality, img.spacing, img.affine, str(path),
                             rgb=img.axes == "YXC")]


def read_dicom(path: Path) -> list[LayerData]:
    """A DICOM series: scale and world affine as for NIfTI, the series' own display window."""
    img = open_image(path)
    layer = image_layer_data(img.data, path.name, img.modality, img.spacing, img.affine,
                             str(path), rgb=img.axes == "YXC")
    if img.meta.get("window") and img.axes != "YXC":
        centre, width = img.meta["window"]
        layer[1]["contrast_limits"] = (centre - width / 2, centre + width / 2)
    return [layer]


def read_cohort(path: Path) -> list[LayerData]:
    """All cases of a cohort root, or one case; each case's labels too when present."""
    kind = _zarr_kind(path)
    root = path if kind == "cohort" else path.parent
    cohort = open_cohort(root)
    case_ids = cohort.case_ids() if kind == "cohort" else [path.name]
    layers: list[LayerData] = []
    skipped = []
    for case_id in case_ids:
        try:
            case = cohort.case(case_id)
        except CohortError as exc:
            if kind != "cohort":
                raise
            log.warning("skipping a case that cannot be read: %s", exc)  # the others load
            skipped.append(case_id)
            continue
        rgb = case.image.ndim == 3 and case.image.shape[-1] == 3 and len(case.spacing) == 2
        layers.append(image_layer_data(case.image, case_id, case.modality, case.spacing,
                                       case.affine, str(root / case_id), rgb=rgb,
                                       case_id=case_id))
        if case.labels is not None:
            meta = layers[-1][1]["metadata"]
            geo = {k: layers[-1][1][k] for k in ("scale", "axis_labels") if k in layers[-1][1]}
            layers.append((case.labels, {"name": f"{case_id} labels", "metadata": meta, **geo},
                           "labels"))
    if skipped and len(skipped) == len(case_ids):
        raise CohortError(f"{root}: no case could be read (e.g. {skipped[0]}; see the log)")
    log.info("read %d case(s) from %s%s", len(case_ids) - len(skipped), root,
             f"; skipped {', '.join(skipped)}" if skipped else "")
    return layers


def read_output(path: Path) -> list[LayerData]:
    """An output store of ``segmote batch``: its first pending case in review order (the Review
    panel walks the rest); or the one case ``path`` names."""
    from segmote_core.review import open_output, review_queue

    if _zarr_kind(path) == "output_case":
        return output_case_layers(open_output(path.parent), path.name)
    store = open_output(path)
    queue = review_queue(store)
    if not queue:
        raise ValueError(f"{path}: no complete case to show")
    entry = next((e for e in queue if not e.reviewed), queue[0])
    log.info("%s: showing case %s (rank %d of %d); the Review panel lists the others", path,
             entry.case, entry.rank, len(queue))
    return output_case_layers(store, entry.case)


def output_case_layers(store: Any, case_id: str, labels_name: str | None = None
                       ) -> list[LayerData]:
    """The case's image (from the cohort the store records) and its labels: the reviewed
    correction when there is one, else the pre-label, editable, in the image's geometry, with
    the per-slice QC in the layer's metadata (``metadata["segmote"]["qc"]``).

    Raises:
        OutputStoreError: the cohort is not where the store says (naming where it looked), the
            case is incomplete or not in the cohort.
    """
    from segmote_core.review import OutputStoreError, read_correction

    cohort = store.open_cohort()
    pre = store.prelabels(case_id)
    try:
        case = cohort.case(case_id)
    except Exception as exc:  # noqa: BLE001 - CohortError, zarr errors
        raise OutputStoreError(f"{store.path}/{case_id}: its image is not in the cohort "
                               f"{store.cohort_path}: {exc}") from exc
    rgb = case.axes == "YXC"
    image = image_layer_data(case.image, case_id, case.modality, case.spacing, case.affine,
                             str(store.cohort_path / case_id), rgb=rgb, case_id=case_id)
    attrs = dict(pre.attrs)
    got = read_correction(store, case_id)
    data, source = (got[0], "reviewed") if got is not None else (np.asarray(pre[...]),
                                                                 "pre-label")
    meta = {"segmote": {**image[1]["metadata"]["segmote"], "output": str(store.path),
                        "case_id": case_id, "labels_source": source,
                        "prelabel_signature": attrs.get("signature_sha256"),
                        "qc": attrs.get("qc"), "qc_case": attrs.get("qc_case"),
                        "qc_components": attrs.get("qc_components"),
                        "router_confidence": attrs.get("confidence"),
                        "label_table": attrs.get("label_table")}}
    geo = {k: image[1][k] for k in ("scale", "axis_labels") if k in image[1]}
    name = labels_name or f"{case_id} {source}"
    kwargs = {"name": name, "metadata": meta, **geo, **label_features(attrs.get("label_table"))}
    return [image, (data, kwargs, "labels")]


def label_features(table: dict[str, str] | None) -> dict[str, Any]:
    """Labels layer ``features`` naming each value by its category (``segmote batch
    --categories``): napari shows the name of the label under the cursor; ``{}`` without a
    table."""
    if not table:
        return {}
    values = sorted(int(v) for v in table)
    return {"features": {"index": [0, *values],
                         "category": ["background", *(str(table[str(v)]) for v in values)]}}
