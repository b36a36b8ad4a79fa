"""The embedding cache at cohort scale: bytes per slice and mask Dice against float32 storage.

For each model: every slice of a demo cohort is embedded once; the embedding is stored in the
cache (half precision, early features as their principal subspace: segmote_core.cache) and, as
the reference, as float32 (the version-1 layout, same zarr codec); PPT masks decoded from both
are compared. ViT-B runs with random weights (no official weights here): it gives the bytes,
its masks only the sensitivity. The demo model and LiteMedSAM (real encoder weights, random
added parts) run on the demo cohort.

    python benchmarks/bench_cache_size.py [--cohort demo_small.zarr] [--vit-b-slices 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote
from segmote_core.build import load_demo_model
from segmote_core.cache import EmbeddingCache
from segmote_core.inference import decode_auto, embed_slices, stack_embeddings
from segmote_core.io import open_cohort


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def _fp32_bytes(folder: Path, entries: list[dict]) -> float:
    """Bytes per slice of the version-1 layout (float32 arrays, the same zarr defaults)."""
    import zarr

    root = zarr.open_group(str(folder), mode="w")
    for name in ("image_embeddings", "interm_embeddings"):
        if name not in entries[0]:
            continue
        shape = entries[0][name].shape
        arr = root.create_array(name, shape=(len(entries), *shape), dtype=np.float32,
                                chunks=(1, *shape))
        for z, e in enumerate(entries):
            arr[z] = e[name]
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json"]
    return sum(f.stat().st_size for f in files) / len(entries)


def _slices(cohort_path: Path, limit: int | None):
    cohort = open_cohort(cohort_path)
    out = []
    for cid in cohort.case_ids():
        case = cohort.case(cid)
        img = np.asarray(case.image[...])
        planes = [img[z] for z in range(img.shape[0])] if case.axes == "ZYX" else [img]
        out += [(p, case.modality) for p in planes]
    return out[:limit] if limit else out


def measure(name: str, model, slices, work: Path) -> dict:
    pred = SegMoTEPredictor(model, precision="fp32")
    cache = EmbeddingCache(work / f"{name}.zarr", {"encoder": pred.encoder_signature()})
    refs, dices, t_put = [], [], 0.0
    for z, (plane, modality) in enumerate(slices):
        (_, emb), = next(iter(embed_slices(model, lambda _: plane, [z], modality, batch=1)))
        refs.append(emb)
        t0 = time.perf_counter()
        stored = cache.put(z, emb)
        t_put += time.perf_counter() - t0
        f32, orig, inp = stack_embeddings(model, [emb])
        f16, _, _ = stack_embeddings(model, [cache.get(z)])
        a = decode_auto(model, f32, orig, inp).masks[0]
        b = decode_auto(model, f16, orig, inp).masks[0]
        assert np.array_equal(stored["image_embeddings"], cache.get(z)["image_embeddings"])
        dices.append(_dice(a, b))
    return {"model": name, "slices": len(slices), "bytes": cache.bytes_per_slice(),
            "fp32_bytes": _fp32_bytes(work / f"{name}_fp32.zarr", refs),
            "dice_min": min(dices), "dice_median": float(np.median(dices)),
            "put_s": t_put / len(slices)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, default=None, help="default: a new small demo cohort")
    ap.add_argument("--vit-b-slices", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cohort = args.cohort
        if cohort is None:
            from training.demo_data import write_demo_cohort

            cohort = work / "demo_small.zarr"
            write_demo_cohort(cohort, small=True)
        rows = [measure("demo (tiny, trained)", load_demo_model(), _slices(cohort, None), work)]
        try:
            torch.manual_seed(0)
            lite = build_segmote(SegMoTEConfig(model_type="lite_medsam")).eval()
            rows.append(measure("lite_medsam (real encoder)", lite, _slices(cohort, None), work))
        except Exception as exc:  # noqa: BLE001 - the optional base is not installed
            print(f"lite_medsam skipped: {exc}")
        torch.manual_seed(0)
        vit_b = build_segmote(SegMoTEConfig(model_type="vit_b")).eval()
        rows.append(measure("vit_b (random)", vit_b, _slices(cohort, args.vit_b_slices), work))
    print("| model | slices | MiB/slice | fp32 MiB/slice | ratio | Dice min | Dice median |"
          " store s/slice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['slices']} | {r['bytes'] / 2**20:.2f} | "
              f"{r['fp32_bytes'] / 2**20:.2f} | {r['fp32_bytes'] / r['bytes']:.2f}x | "
              f"{r['dice_min']:.4f} | {r['dice_median']:.4f} | {r['put_s']:.3f} |")


if __name__ == "__main__":
    main()
