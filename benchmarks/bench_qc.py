"""Does the QC score find the bad pre-labels? Spearman(QC, Dice) on degraded held-out demo cases.

Demo cases of a seed the demo model never saw (training used seed 0) are degraded the way a
scanner or a careless acquisition degrades images, none of which training used (it only flipped
and jittered gain/offset): Gaussian noise, blur (defocus / patient motion), a smooth bias field
(coil shading), low dose (few photons: Poisson noise at low contrast), motion ghosting (k-space
lines with a phase error), partial occlusion (a ruler, a lead marker, a hair patch), low
resolution; a share stays clean. Each slice is segmented prompt-free (PPT auto) exactly as
``segmote batch`` does (``segmote_core.qc.segment_with_qc``), rated by the QC score, and compared
with its true Dice. Printed: Spearman(QC, Dice) per dataset and overall (with the router
confidence and each component beside it), and the share of the worst 10 % slices (true Dice)
that a queue ordered by QC puts in its first 20 %: through the slice queue the review walks
(``review_slices.csv``: worst slices across the cohort), by bare slice QC, and through the case
queue (cases by case QC, then each case's slices worst first).

    python benchmarks/bench_qc.py [--seed 11] [--brain 4 --xray 60 --derm 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import numpy as np
from scipy import ndimage, stats

from segmote_core import qc as QC

DEGRADATIONS = ("none", "noise", "blur", "bias", "lowdose", "ghost", "occlusion", "lowres")


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator, fg: np.ndarray) -> np.ndarray:
    """One degradation of a (Y, X) or (Y, X, 3) image; the result keeps the input's dtype."""
    x = img.astype(np.float64)
    rgb = x.ndim == 3
    chans = [x[..., c] for c in range(3)] if rgb else [x]
    lo, hi = float(x.min()), float(x.max())
    span = max(hi - lo, 1e-6)
    h, w = x.shape[:2]
    out = []
    field = None
    if kind == "bias":
        field = ndimage.zoom(rng.normal(size=(4, 4)), (h / 4, w / 4), order=3)[:h, :w]
        field = np.exp(rng.uniform(0.5, 1.2) * field / (np.abs(field).max() + 1e-9))
    if kind == "occlusion":
        ys, xs = np.nonzero(fg) if fg.any() else (np.array([h // 2]), np.array([w // 2]))
        bh = max(4, int((ys.max() - ys.min() + 1) * rng.uniform(0.35, 0.7)))
        bw = max(4, int((xs.max() - xs.min() + 1) * rng.uniform(0.35, 0.7)))
        cy = int(rng.integers(ys.min(), ys.max() + 1))
        cx = int(rng.integers(xs.min(), xs.max() + 1))
        fill = hi if rng.random() < 0.5 else lo
    params = {"noise": rng.uniform(0.15, 0.6), "blur": rng.uniform(2.0, 5.0),
              "lowdose": (rng.uniform(2.0, 12.0), rng.uniform(0.15, 0.4)),
              "ghost": rng.uniform(0.8, 2.2), "lowres": int(rng.integers(4, 9))}
    for c in chans:
        if kind == "noise":
            c = c + rng.normal(0, params["noise"] * c.std() + 1e-6, c.shape)
        elif kind == "blur":
            c = ndimage.gaussian_filter(c, params["blur"])
        elif kind == "bias":
            c = lo + (c - lo) * field
        elif kind == "lowdose":
            counts, contrast = params["lowdose"]
            m = c.mean()
            c = m + (c - m) * contrast
            c = rng.poisson(np.clip((c - lo) / span, 0, None) * counts) / counts * span + lo
        elif kind == "ghost":
            k = np.fft.fft2(c)
            k[::2] *= np.exp(1j * params["ghost"])
            c = np.abs(np.fft.ifft2(k))
        elif kind == "occlusion":
            c = c.copy()
            c[max(0, cy - bh // 2):cy + bh // 2, max(0, cx - bw // 2):cx + bw // 2] = fill
        elif kind == "lowres":
            f = params["lowres"]
            small = c[::f, ::f]
            c = np.repeat(np.repeat(small, f, 0), f, 1)[:h, :w]
        out.append(c)
    res = np.stack(out, -1) if rgb else out[0]
    if img.dtype == np.uint8:
        return np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return res.astype(img.dtype)


def _cases(seed: int, counts: dict[str, int]):
    from training.demo_data import iter_demo_cases

    plan = [d for d, n in counts.items() if n > 0]
    taken: dict[str, int] = defaultdict(int)
    for case in iter_demo_cases(seed=seed, datasets=plan):
        ds = case.attrs["dataset"]
        if taken[ds] >= counts[ds]:
            continue
        taken[ds] += 1
        yield case


def _truth(case) -> np.ndarray:
    # the auto (PPT) target of each binary dataset: brain = grey + white matter, lung, lesion
    return np.asarray(case.labels) > 0


def run(seed: int, counts: dict[str, int], threads: int, clean_share: float = 0.25):
    import torch

    from segmote_core import load_demo_model
    from segmote_core.build import demo_model_path

    torch.set_num_threads(threads)
    model = load_demo_model()
    rng = np.random.default_rng([seed, 99])
    rows = []
    for case in _cases(seed, counts):
        volume = case.axes_hint == "ZYX"
        images = case.image if volume else case.image[None]
        truth = _truth(case) if volume else _truth(case)[None]
        degraded, kinds = [], []
        for z in range(len(images)):
            kind = "none" if rng.random() < clean_share else str(rng.choice(DEGRADATIONS[1:]))
            degraded.append(degrade(images[z], kind, rng, truth[z]))
            kinds.append(kind)
        res, sig = QC.segment_with_qc(model, np.stack(degraded), case.modality, chunk=8)
        masks = res.masks
        qc, comps = QC.slice_qc(sig, (lambda z: masks[z]) if volume else None)
        case_value = QC.case_qc(qc.tolist())
        for z in range(len(images)):
            t, p = truth[z], masks[z]
            denom = t.sum() + p.sum()
            dice = 2.0 * (t & p).sum() / denom if denom else 1.0
            rows.append({"dataset": case.attrs["dataset"], "case": case.case_id, "z": z,
                         "kind": kinds[z], "dice": dice, "qc": qc[z], "case_qc": case_value,
                         "confidence": float(res.confidence[z]),
                         **{k: float(v[z]) for k, v in comps.items()}})
    return rows, str(demo_model_path())


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(stats.spearmanr(a[ok], b[ok]).statistic)


def worst_decile_share(rows: list[dict], order: list[int]) -> float:
    """Share of the worst 10 % slices (true Dice) among the first 20 % of ``order``."""
    n = len(rows)
    dice = np.array([r["dice"] for r in rows])
    worst = set(np.argsort(dice, kind="stable")[:max(1, int(round(0.1 * n)))].tolist())
    first = set(order[:max(1, int(round(0.2 * n)))])
    return len(worst & first) / len(worst)


def _qc_key(v: float) -> float:
    # nothing segmented (QC null) goes first: an empty pre-label where a structure was expected
    return -1.0 if not math.isfinite(v) else v


def _order_by(rows: list[dict], key: str) -> list[int]:
    return sorted(range(len(rows)), key=lambda i: (_qc_key(rows[i][key]), i))


def slice_order(rows: list[dict]) -> list[int]:
    return _order_by(rows, "qc")


def case_queue_order(rows: list[dict]) -> list[int]:
    by_case: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_case[r["case"]].append(i)
    cases = sorted(by_case, key=lambda c: (_qc_key(rows[by_case[c][0]]["case_qc"]), c))
    return [i for c in cases for i in sorted(by_case[c], key=lambda i: (_qc_key(rows[i]["qc"]), i))]


def review_slices_order(rows: list[dict]) -> list[int]:
    """Rows in the order of the cohort's slice queue (``review_slices.csv``,
    :func:`segmote_core.qc.slice_review_order`); slices it does not list come last."""
    per_case: dict[str, dict[int, float]] = defaultdict(dict)
    where = {}
    for i, r in enumerate(rows):
        per_case[r["case"]][int(r["z"])] = r["qc"]
        where[(r["case"], int(r["z"]))] = i
    qcs = {c: [v.get(z) for z in range(max(v) + 1)] for c, v in per_case.items()}
    order = [where[(c, z)] for c, z, _ in QC.slice_review_order(qcs) if (c, z) in where]
    listed = set(order)
    return order + [i for i in range(len(rows)) if i not in listed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=11, help="demo seed (training used 0)")
    ap.add_argument("--brain", type=int, default=4, help="brain patients (~34 slices each)")
    ap.add_argument("--xray", type=int, default=60)
    ap.add_argument("--derm", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump", help="write the per-slice rows to this CSV")
    ap.add_argument("--rows", help="print the tables of an earlier --dump instead of running")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.rows:
        import pandas as pd

        rows = rescore(pd.read_csv(args.rows).to_dict("records"))
        model_path = f"rows of {args.rows}"
    else:
        rows, model_path = run(args.seed, {"mni_brain": args.brain, "xray_lungs": args.xray,
                                           "derm_lesion": args.derm}, args.threads)
    if args.dump:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.dump, index=False)
    report(rows, f"model: {model_path}; seed {args.seed}; {len(rows)} slices; "
                 f"{time.perf_counter() - t0:.0f} s")


def rescore(rows: list[dict]) -> list[dict]:
    """Recompute QC and case QC of dumped rows with the current weights."""
    qc = QC.combine({c: [r[c] for r in rows] for c in QC.COMPONENTS})
    by_case: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        r["qc"] = float(qc[i])
        by_case[r["case"]].append(i)
    for idx in by_case.values():
        value = QC.case_qc([rows[i]["qc"] for i in idx])
        for i in idx:
            rows[i]["case_qc"] = value
    return rows


def report(rows: list[dict], title: str) -> None:
    cols = ["qc", "confidence", *QC.COMPONENTS]
    print(title)
    print("Spearman with the true Dice; 'QC as queued' counts an empty mask (QC null) as the "
          "lowest, the other columns use the slices where the signal exists")
    print("| dataset | slices | mean Dice | empty masks | QC as queued | " + " | ".join(cols)
          + " |")
    print("| --- " * (5 + len(cols)) + "|")
    groups = sorted({r["dataset"] for r in rows}) + ["all"]
    for g in groups:
        sub = [r for r in rows if g == "all" or r["dataset"] == g]
        dice = [r["dice"] for r in sub]
        empty = sum(not math.isfinite(r["qc"]) for r in sub)
        queued = spearman([_qc_key(r["qc"]) for r in sub], dice)
        cells = [f"{spearman([r[c] for r in sub], dice):+.2f}" for c in cols]
        print(f"| {g} | {len(sub)} | {np.mean(dice):.3f} | {empty} | {queued:+.2f} | "
              + " | ".join(cells) + " |")
    print(f"worst decile (true Dice) in the first 20 %: through the slice queue "
          f"(review_slices.csv) {100 * worst_decile_share(rows, review_slices_order(rows)):.0f} %, "
          f"by slice QC (empty first) "
          f"{100 * worst_decile_share(rows, slice_order(rows)):.0f} %, through the case queue "
          f"{100 * worst_decile_share(rows, case_queue_order(rows)):.0f} %, by router confidence "
          f"{100 * worst_decile_share(rows, _order_by(rows, 'confidence')):.0f} %")
    kinds = defaultdict(list)
    for r in rows:
        kinds[r["kind"]].append(r)
    print("per degradation: " + ", ".join(
        f"{k} n={len(v)} Dice {np.mean([r['dice'] for r in v]):.2f} QC "
        f"{np.nanmean([r['qc'] for r in v]):.2f}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
