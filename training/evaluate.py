"""Evaluation: Dice per dataset and category for point, box and auto (PPT) prompting
(``segmote evaluate CHECKPOINT COHORT OUT_DIR``; the paper's Tables 1, 2 and 4, Fig. 6a and 7).

Prompts come from the ground truth at the cohort's resolution, without jitter, so runs are
deterministic: ``box`` = the mask's tight box; ``point`` = one positive point at the mask's most
interior pixel (largest distance to the background); ``auto`` = PPT, no prompt, for PPT-eligible
masks, and each category that shares its slice with others of its dataset (e.g. grey matter
inside the brain) with its text token as PPT's guide (category-conditioned PPT, what
``segmote batch --categories`` runs; without the overlap resolution between categories). Such a
category gets its text token beside the box or point too, as in training. Dice is computed at the
cohort's resolution after SAM's postprocessing (unpad, resize).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from segmote_core.fileio import atomic_write, atomic_write_text
from segmote_core.geometry import interior_point, mask_to_box
from segmote_core.modeling import ImageFeatures, SegMoTE
from segmote_core.predictor import use_bf16
from segmote_core.progress import CancelToken, ProgressCallback, report
from segmote_core.transforms import ResizePad

from .dataset import SliceDataset, model_input
from .losses import dice_score

__all__ = ["EvalResult", "evaluate_model", "write_report", "MODES"]

log = logging.getLogger(__name__)

MODES = ("point", "box", "auto")


@dataclass
class EvalResult:
    """Per-mask scores (one row per mask and prompt mode) and examples for the figures."""

    rows: pd.DataFrame
    examples: list[dict[str, Any]] = field(default_factory=list)
    num_experts: int = 0
    num_tokens: int = 0


@torch.inference_mode()
def evaluate_model(model: SegMoTE, dataset: SliceDataset, *, modes: Sequence[str] = MODES,
                   chunk: int = 8, examples_per_dataset: int = 1,
                   progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None, precision: str = "auto") -> EvalResult:
    """Score every mask of ``dataset`` (built with ``keep_original=True``) under each mode.

    The encoder runs at ``precision`` (``segmote_core.predictor.use_bf16``: by default bf16
    where the hardware has it), as the pipeline and the plugin run it, so the scores measure
    the path users get.

    Raises:
        ValueError: the dataset lacks original masks or has another input size than the model.
    """
    if dataset.original_masks is None:
        raise ValueError("evaluation needs the masks at the cohort's resolution: build the "
                         "dataset with keep_original=True")
    if dataset.image_size != model.image_size:
        raise ValueError(f"dataset slices are {dataset.image_size} px, the model takes "
                         f"{model.image_size} px")
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"unknown evaluation modes {bad}; choose from {MODES}")
    model.eval()
    bf16 = use_bf16(model, precision)
    text_index = ({n: i for i, n in enumerate(model.config.vocabulary)}
                  if model.text_encoder is not None else {})
    resize = ResizePad(model.image_size)
    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    seen_examples: dict[str, int] = {}
    n = dataset.num_slices
    for start in range(0, n, chunk):
        sl = np.arange(start, min(start + chunk, n))
        feats = model.encode(model_input(model, dataset.images[sl], dataset.extents[sl]),
                             autocast=bf16)
        mids = np.flatnonzero(np.isin(dataset.mask_slice, sl))
        for mode in modes:
            if mode == "auto" and model.ppt is None:
                continue
            # a category that shares its slice gets its text token: beside the box or point,
            # or as PPT's guide (category-conditioned PPT); prompt-free without one is only
            # for the binary masks
            texted = np.array([bool(dataset.needs_text[m]) and not dataset.binary[m]
                               and dataset.categories[m] in text_index for m in mids], bool)
            keep = (dataset.binary[mids] | texted) if mode == "auto" else np.ones(len(mids), bool)
            use, use_text = mids[keep], texted[keep]
            for group, with_text in ((use[use_text], True), (use[~use_text], False)):
                if len(group):
                    rows += _score_group(model, feats, dataset, group, sl[0], mode,
                                         text_index if with_text else {}, resize,
                                         examples, seen_examples, examples_per_dataset)
        report(progress, int(sl[-1]) + 1, n, cancel)
    e = model.config.num_experts if model.config.use_experts else 0
    return EvalResult(pd.DataFrame(rows), examples, e, model.config.num_expert_tokens)


def _score_group(model: SegMoTE, feats: ImageFeatures, ds: SliceDataset, mids: np.ndarray,
                 first_slice: int, mode: str, text_index: dict[str, int], resize: ResizePad,
                 examples: list, seen: dict[str, int], per_dataset: int) -> list[dict[str, Any]]:
    dev = model.device
    slices = ds.mask_slice[mids]
    idx = torch.as_tensor(slices - first_slice, device=dev)
    sub = ImageFeatures(feats.image_embeddings.index_select(0, idx),
                        None if feats.interm_embeddings is None
                        else feats.interm_embeddings.index_select(0, idx))
    kwargs: dict[str, Any] = {}
    originals = [ds.original_masks[m] for m in mids]
    shapes = [tuple(int(v) for v in ds.original_shapes[s]) for s in slices]
    if mode == "box":
        boxes = np.stack([resize.apply_boxes(mask_to_box(o), shp) for o, shp in zip(originals, shapes)])
        kwargs["boxes"] = torch.as_tensor(boxes, device=dev)
    elif mode == "point":
        pts = np.stack([resize.apply_coords(interior_point(o), shp) for o, shp in zip(originals, shapes)])
        kwargs["points"] = (torch.as_tensor(pts[:, None], device=dev),
                            torch.ones(len(mids), 1, dtype=torch.long, device=dev))
    else:
        kwargs["auto"] = True
    if text_index:
        kwargs["text_ids"] = torch.as_tensor([text_index[ds.categories[m]] for m in mids],
                                             device=dev)
    want_heat = model.config.use_experts and any(seen.get(ds.datasets[s], 0) < per_dataset
                                                 for s in slices)
    out = model.decode(sub, want_heatmaps=want_heat, **kwargs)
    # one host copy per group, not three syncs per mask
    none = [None] * len(mids)
    tokens = out.selected_token.tolist() if out.selected_token is not None else none
    experts = out.selected_expert.tolist() if out.selected_expert is not None else none
    confs = out.confidence.float().tolist() if out.confidence is not None else none
    rows = []
    for j, m in enumerate(mids):
        s = int(slices[j])
        h, w = (int(v) for v in ds.extents[s])
        logits = model.sam.postprocess_masks(out.low_res_masks[j:j + 1, :1], (h, w), shapes[j])
        pred = (logits[0, 0] > 0).cpu().numpy()
        row = {"case": ds.cases[s], "z": int(ds.z[s]), "dataset": ds.datasets[s],
               "modality": ds.modalities[s], "category": ds.categories[m],
               "binary": bool(ds.binary[m]), "mode": mode, "text": "text_ids" in kwargs,
               "dice": dice_score(pred, originals[j]),
               "token": int(tokens[j]) if tokens[j] is not None else -1,
               "expert": int(experts[j]) if experts[j] is not None else -1,
               "confidence": float(confs[j]) if confs[j] is not None else np.nan}
        rows.append(row)
        if out.heatmaps is not None and seen.get(row["dataset"], 0) < per_dataset:
            seen[row["dataset"]] = seen.get(row["dataset"], 0) + 1
            heat = torch.nn.functional.interpolate(out.heatmaps[j:j + 1].float(),
                                                   size=(model.image_size,) * 2,
                                                   mode="bilinear", align_corners=False)[0]
            examples.append({**row, "image": ds.images[s][:, :h, :w].transpose(1, 2, 0),
                             "mask": ds.masks[m][:h, :w], "pred": (torch.nn.functional.interpolate(
                                 out.low_res_masks[j:j + 1, :1].float(),
                                 size=(model.image_size,) * 2, mode="bilinear",
                                 align_corners=False)[0, 0, :h, :w] > 0).cpu().numpy(),
                             "heatmaps": heat[:, :h, :w].cpu().numpy()})
    return rows


def _pivot(rows: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    table = rows.pivot_table(index=index, columns="mode", values="dice", aggfunc="mean")
    table = table.reindex(columns=[m for m in MODES if m in table.columns])
    counts = rows[rows["mode"] == rows["mode"].iloc[0]].groupby(index).size()
    table["masks"] = counts.reindex(table.index).fillna(0).astype(int)
    return table


def _markdown(table: pd.DataFrame, title: str) -> str:
    cols = list(table.columns)
    names = list(table.index.names)
    lines = [f"### {title}", "", "| " + " | ".join(names + cols) + " |",
             "|" + "---|" * (len(names) + len(cols))]
    for key, row in table.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        cells = [str(k) for k in key]
        for c in cols:
            v = row[c]
            cells.append(str(int(v)) if c == "masks" else ("—" if pd.isna(v) else f"{v:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tables(result: EvalResult) -> dict[str, pd.DataFrame]:
    """The paper-style tables: per dataset (Table 1), per category (Table 2), PPT (Table 4)."""
    rows = result.rows
    # a dataset's auto is its binary task's (Table 1); its categories' prompt-free Dice,
    # guided by their text tokens, is in the per-category table
    out = {"datasets": _pivot(rows[(rows["mode"] != "auto") | rows["binary"]],
                              ["dataset", "modality"]),
           "categories": _pivot(rows, ["dataset", "category"])}
    binary = rows[rows["binary"]]
    if len(binary) and (binary["mode"] == "auto").any():
        out["ppt"] = _pivot(binary[binary["mode"].isin(["point", "auto"])],
                            ["dataset", "category"]).rename(
            columns={"point": "point (w/o PPT)", "auto": "auto (PPT)"})
    return out


def write_report(result: EvalResult, out_dir: str | Path, *, title: str = "SegMoTE",
                 figures: bool = True) -> dict[str, Path]:
    """Write per-mask CSV, the tables (CSV + one Markdown file), summary JSON and PNG figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_mask": out / "per_mask.csv"}
    atomic_write(paths["per_mask"], lambda tmp: result.rows.to_csv(tmp, index=False))
    md = [f"## {title}: Dice on held-out slices", ""]
    names = {"datasets": "Dice per dataset (Table 1 style)",
             "categories": "Dice per category (Table 2 style)",
             "ppt": "Prompt-free PPT vs one point, binary targets (Table 4 style)"}
    for key, table in tables(result).items():
        paths[f"table_{key}"] = out / f"table_{key}.csv"
        atomic_write(paths[f"table_{key}"], table.to_csv)
        md.append(_markdown(table, names[key]))
    paths["tables_md"] = out / "tables.md"
    atomic_write_text(paths["tables_md"], "\n".join(md))
    summary = {mode: float(g["dice"].mean()) for mode, g in result.rows.groupby("mode")}
    paths["summary"] = out / "summary.json"
    atomic_write_text(paths["summary"], json.dumps({"mean_dice": summary,
                                                    "masks": len(result.rows)}, indent=2))
    if figures and result.num_tokens:
        from .figures import expert_usage_figure, routing_figure
        paths["expert_usage"] = expert_usage_figure(result.rows, result.num_tokens,
                                                    result.num_experts, out / "expert_usage.png")
        if result.examples:
            paths["routing"] = routing_figure(result.examples, out / "routing_heatmaps.png")
    log.info("evaluation written to %s", out)
    return paths
