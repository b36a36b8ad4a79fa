"""Peak memory of embedding a whole volume: SegMoTE's lazy reader + signed zarr embedding cache vs
the stock SAM way (load the whole NIfTI, ``SamPredictor.set_image`` per slice, keep embeddings).

Each measurement runs in a fresh process (peak RSS from ``getrusage``), for a 40-slice and a
400-slice 512 x 512 CT volume (.nii.gz), with the same tiny random-weight encoder. Acceptance:
SegMoTE's peak at 400 slices stays within 1.5x of its peak at 40.

    python benchmarks/bench_volume_memory.py [--slices 40 400] [--image-size 128] [--side 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_volume(path: Path, n: int, side: int) -> None:
    """A CT-like int16 volume written slab by slab (the parent never holds it whole)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[:side, :side]
    body = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2) < (0.45 * side) ** 2
    vol = np.empty((side, side, n), np.int16)             # NIfTI order (X, Y, Z)
    for z in range(n):
        sl = np.where(body, 40, -1000).astype(np.int16)
        r = 0.1 * side * (1 + np.sin(z / max(n, 1) * np.pi))
        sl[((yy - side / 2) ** 2 + (xx - side / 2 - 20) ** 2) < r ** 2] = 200
        vol[:, :, z] = (sl + rng.integers(-20, 20, sl.shape)).T
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.5, 1.0])), str(path))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def child(mode: str, path: str, image_size: int, cache_dir: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote

    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="tiny", image_size=image_size)).eval()
    base = _peak_mb()
    times: list[float] = []
    t_all = time.perf_counter()
    if mode == "segmote":
        from segmote_core.cache import EmbeddingCache
        from segmote_core.io import open_image

        img = open_image(path)
        pred = SegMoTEPredictor(model, precision="fp32")
        cache = EmbeddingCache.for_volume(Path(cache_dir) / "emb.zarr", pred, img, modality="CT")
        last = [time.perf_counter()]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        cache.compute_volume(img, pred, "CT", progress=progress, batch=4)
        n = img.n_slices
        times = [t / 4 for t in times[1:]]
    else:  # the stock SAM way: whole volume in memory, SamPredictor per slice, embeddings kept
        import nibabel as nib
        from segment_anything import SamPredictor

        vol = nib.load(path).get_fdata()                    # (X, Y, Z) float64
        sam_pred = SamPredictor(model.sam)
        kept = []
        for z in range(vol.shape[2]):
            t = time.perf_counter()
            sl = np.clip((vol[:, :, z].T + 160) / 400 * 255, 0, 255).astype(np.uint8)
            sam_pred.set_image(np.repeat(sl[..., None], 3, axis=-1))
            kept.append(sam_pred.get_image_embedding().cpu())
            times.append(time.perf_counter() - t)
        n = vol.shape[2]
    print(json.dumps({"mode": mode, "slices": n, "peak_mb": _peak_mb(), "after_model_mb": base,
                      "median_s_per_slice": statistics.median(times),
                      "total_s": time.perf_counter() - t_all}))


def run(mode: str, path: Path, image_size: int) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(path),
                              str(image_size), cache_dir], capture_output=True, text=True,
                             check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs=2, default=[40, 400])
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=128, help="tiny encoder input side")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock SAM baseline")
    args = ap.parse_args()
    res: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.slices:
            path = Path(tmp) / f"ct_{n}.nii.gz"
            make_volume(path, n, args.side)
            print(f"volume {n} x {args.side} x {args.side} int16: "
                  f"{path.stat().st_size / 2**20:.1f} MiB on disk (gz), "
                  f"{n * args.side ** 2 * 2 / 2**20:.0f} MiB raw", flush=True)
            for mode in ("segmote",) + (() if args.no_stock else ("stock",)):
                r = run(mode, path, args.image_size)
                res[(mode, n)] = r
                print(f"  {mode:8s} {n:4d} slices: peak RSS {r['peak_mb']:7.1f} MiB "
                      f"(after model load {r['after_model_mb']:6.1f}), median "
                      f"{r['median_s_per_slice'] * 1000:6.1f} ms/slice, total {r['total_s']:.1f} s",
                      flush=True)
    small, big = args.slices

    def growth(mode: str, n: int) -> float:  # what the volume adds above the loaded model
        return res[(mode, n)]["peak_mb"] - res[(mode, n)]["after_model_mb"]

    seg = res[("segmote", big)]["peak_mb"] / res[("segmote", small)]["peak_mb"]
    print(f"\nSegMoTE peak {big}/{small} slices: {seg:.3f}x  (acceptance: <= 1.5x) "
          f"{'PASS' if seg <= 1.5 else 'FAIL'}; growth above the model "
          f"{growth('segmote', small):.1f} -> {growth('segmote', big):.1f} MiB")
    if not args.no_stock:
        stock = res[("stock", big)]["peak_mb"] / res[("stock", small)]["peak_mb"]
        print(f"stock SAM peak {big}/{small} slices: {stock:.3f}x; growth above the model "
              f"{growth('stock', small):.1f} -> {growth('stock', big):.1f} MiB")
        print(f"at {big} slices SegMoTE / stock peak: "
              f"{res[('segmote', big)]['peak_mb'] / res[('stock', big)]['peak_mb']:.3f}x; "
              f"median time per slice SegMoTE / stock: "
              f"{res[('segmote', big)]['median_s_per_slice'] / res[('stock', big)]['median_s_per_slice']:.3f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
