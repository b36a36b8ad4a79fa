"""A real-image check that needs no labels: does the mask stay inside its box on real scans?

The demo cohort is synthetic (a template brain and phantoms), so its Dice says little about
real scans. pydicom ships a handful of real CT and MR slices with its test files; on each, random
boxes are drawn over the body and the model prompted with them. A model that follows its box
puts (nearly) all of the mask inside it; one that ignores the prompt (a model trained from
scratch on phantoms) spreads it over the slice. No label is needed, and nothing is downloaded:
only the files inside the installed pydicom wheel are read.

A box **passes** when its mask is not empty and at least ``inside`` (95 %) of the mask's pixels
lie in the box; the check passes when at least ``min_pass_rate`` (90 %) of the boxes pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segmote_core.fileio import atomic_write_text
from segmote_core.transforms import normalize_intensity

from .prompts import body_boxes

__all__ = ["RealSlice", "real_slices", "random_boxes", "real_image_check",
           "run_real_image_check", "CheckResult"]

log = logging.getLogger(__name__)

INSIDE = 0.95
MIN_PASS_RATE = 0.90
MIN_SIDE = 64          # pydicom also ships 16 x 16 DICOMDIR test slices: too small to prompt


@dataclass
class RealSlice:
    name: str            # file name inside pydicom's test files
    modality: str        # "CT" (Hounsfield units) or "MR"
    image: np.ndarray    # (Y, X) float32 (CT in HU)


def real_slices(min_side: int = MIN_SIDE) -> list[RealSlice]:
    """The distinct real CT/MR slices among pydicom's bundled test files (first frame each).

    Files are read from the installed wheel only; duplicates (the same pixels in another
    transfer syntax) are kept once; files whose pixel data this installation cannot decode are
    skipped with a log line.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError as exc:
        raise RuntimeError("the real-image check reads pydicom's test files: "
                           "pip install 'segmote[litemedsam]'") from exc
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    out, seen = [], set()
    for path in sorted(p for p in root.glob("*.dcm") if p.is_file()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                modality = str(getattr(header, "Modality", ""))
                if modality not in ("CT", "MR") or min(int(getattr(header, "Rows", 0)),
                                                       int(getattr(header, "Columns", 0))) < min_side:
                    continue
                ds = pydicom.dcmread(path)
                pixels = ds.pixel_array
            except Exception as exc:  # an undecodable transfer syntax, a truncated test file
                log.info("real-image check: skipping %s (%s)", path.name, type(exc).__name__)
                continue
        if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
            pixels = pixels[0]
        if pixels.ndim != 2:
            continue
        digest = hashlib.sha256(np.ascontiguousarray(pixels).astype(np.int64).tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        image = apply_modality_lut(pixels, ds) if modality == "CT" else pixels
        out.append(RealSlice(path.name, modality, np.asarray(image, dtype=np.float32)))
    return out


def random_boxes(image: np.ndarray, modality: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 4) XYXY boxes of 15-50 % of each side, centred on body pixels (not air)."""
    norm = normalize_intensity(image, modality).mean(-1) if image.ndim == 2 else image
    return body_boxes(norm, n, rng)


def inside_fraction(mask: np.ndarray, box: np.ndarray) -> float | None:
    """Share of ``mask``'s pixels inside the XYXY ``box`` (edges included); None if empty."""
    total = int(mask.sum())
    if total == 0:
        return None
    x0, y0, x1, y1 = (int(v) for v in box)
    return float(mask[y0:y1 + 1, x0:x1 + 1].sum()) / total


@dataclass
class CheckResult:
    rows: list[dict[str, Any]]
    embed_seconds: list[float]
    prompt_seconds: list[float]
    inside: float = INSIDE
    min_pass_rate: float = MIN_PASS_RATE
    examples: list[tuple[RealSlice, np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def pass_rate(self) -> float:
        return float(np.mean([r["passed"] for r in self.rows])) if self.rows else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.rows) and self.pass_rate >= self.min_pass_rate

    def summary(self) -> dict[str, Any]:
        fr = [r["inside_fraction"] for r in self.rows if r["inside_fraction"] is not None]
        return {"slices": len({r["slice"] for r in self.rows}), "boxes": len(self.rows),
                "boxes_passed": int(sum(r["passed"] for r in self.rows)),
                "pass_rate": round(self.pass_rate, 4),
                "mean_inside_fraction": round(float(np.mean(fr)), 4) if fr else None,
                "empty_masks": int(sum(r["inside_fraction"] is None for r in self.rows)),
                "criterion": f">= {self.min_pass_rate:.0%} of boxes with >= {self.inside:.0%} "
                             f"of a non-empty mask inside the box",
                "passed": self.passed,
                "median_embed_ms": round(1000 * float(np.median(self.embed_seconds)), 1),
                "median_prompt_ms": round(1000 * float(np.median(self.prompt_seconds)), 1)}


def real_image_check(model, *, boxes_per_slice: int = 12, seed: int = 0,
                     inside: float = INSIDE, min_pass_rate: float = MIN_PASS_RATE,
                     examples: int = 4) -> CheckResult:
    """Prompt ``model`` with random boxes on pydicom's real slices; see the module doc."""
    from segmote_core.predictor import SegMoTEPredictor

    predictor = SegMoTEPredictor(model)
    slices = real_slices()
    if not slices:
        raise RuntimeError("no decodable CT/MR slice among pydicom's test files")
    rng = np.random.default_rng(seed)
    result = CheckResult([], [], [], inside, min_pass_rate)
    for k, sl in enumerate(slices):
        t0 = time.perf_counter()
        predictor.set_image(sl.image, modality=sl.modality)
        result.embed_seconds.append(time.perf_counter() - t0)
        for j, box in enumerate(random_boxes(sl.image, sl.modality, boxes_per_slice, rng)):
            t0 = time.perf_counter()
            mask = predictor.predict(box=box).masks[0]
            result.prompt_seconds.append(time.perf_counter() - t0)
            frac = inside_fraction(mask, box)
            result.rows.append({"slice": sl.name, "modality": sl.modality, "box": j,
                                "x0": int(box[0]), "y0": int(box[1]), "x1": int(box[2]),
                                "y1": int(box[3]), "mask_pixels": int(mask.sum()),
                                "inside_fraction": None if frac is None else round(frac, 4),
                                "passed": frac is not None and frac >= inside})
            if j == 0 and k < examples:
                result.examples.append((sl, box, mask))
    return result


def write_check(result: CheckResult, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """``real_image_check.json`` (summary + every box) and ``real_images.png`` in ``out_dir``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "real_image_check.json", "csv": out / "real_image_check.csv",
             "figure": out / "real_images.png"}
    atomic_write_text(paths["json"], json.dumps({"title": title, **result.summary()}, indent=2))
    pd.DataFrame(result.rows).to_csv(paths["csv"], index=False)
    _figure(result, paths["figure"], title)
    return paths


def _figure(result: CheckResult, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = max(1, len(result.examples))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (sl, box, mask) in zip(axes[0], result.examples):
        ax.imshow(normalize_intensity(sl.image, sl.modality)[..., 0], cmap="gray")
        overlay = np.zeros((*mask.shape, 4), np.float32)
        overlay[mask] = (1.0, 0.2, 0.2, 0.45)
        ax.imshow(overlay)
        ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1],
                               fill=False, edgecolor="yellow", linewidth=1.5))
        frac = inside_fraction(mask, box)
        ax.set_title(f"{sl.name} ({sl.modality})\n"
                     f"{'empty mask' if frac is None else f'{frac:.0%} inside'}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_real_image_check(model, out_dir: str | Path, *, title: str = "",
                         boxes_per_slice: int = 12, seed: int = 0) -> CheckResult:
    """Run the check and write its report; logs the pass rate."""
    result = real_image_check(model, boxes_per_slice=boxes_per_slice, seed=seed)
    write_check(result, out_dir, title=title)
    s = result.summary()
    log.info("real-image check: %d/%d boxes with >= %.0f%% inside (%.1f%%; %s)",
             s["boxes_passed"], s["boxes"], 100 * result.inside, 100 * s["pass_rate"],
             "passed" if s["passed"] else "FAILED")
    return result
