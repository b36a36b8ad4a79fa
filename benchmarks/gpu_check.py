"""The GPU check: everything only a CUDA machine can show, in one run, one table.

1. Embedding throughput of the vit_b encoder (bf16 autocast) at 1024 and 512 px against the
   GPU's bf16 FLOP bound (peak from a small table by device name; FLOPs per slice counted
   with ``torch.utils.flop_counter`` on the real model).
2. ``segmote batch`` with GPU actors: (a) the bundled demo model on a demo cohort, GPU labels
   against a CPU run of the same command (Dice per case >= 0.98, voxel agreement >= 0.99);
   (b) a vit_b SegMoTE at 1024 px (random weights, recorded as trained) for slices/s against
   the target (>= 40 % of the FLOP bound), GPU utilisation sampled with ``nvidia-smi``.
3. Training steps on cached embeddings (the real trainer, demo recipe's batch 16), steps/s.
4. The plugin's session: embed and prompt latency (``SegMoTEPredictor``) on CUDA vs the CPU.

    bash benchmarks/gpu_check.sh            # wraps this with a timeout and the CUDA check
    python benchmarks/gpu_check.py --quick  # fewer repeats

Exit status: 0 all equal and all targets met; 1 a mismatch or an error; 4 equal but a target
missed (the table says which).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

#: Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets; SXM where there are two).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0,
                    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "A30": 165.0, "RTX 6000 Ada": 364.0,
                    "A6000": 155.0, "RTX 4090": 165.0, "RTX 3090": 71.0}

ROWS: list[tuple[str, str, str, str]] = []  # (check, value, target, status)
FAILED: list[str] = []
MISSED: list[str] = []


def row(check: str, value: str, target: str = "", ok: bool | None = None,
        mismatch: bool = False) -> None:
    status = "" if ok is None else ("ok" if ok else ("MISMATCH" if mismatch else "MISS"))
    ROWS.append((check, value, target, status))
    if ok is False:
        (FAILED if mismatch else MISSED).append(check)


def peak_tflops(name: str) -> float | None:
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


def sync() -> None:
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------ 1. encoder
def encoder_flops(model, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, device="cuda")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.sam.image_encoder(x)
    return float(counter.get_total_flops())


def check_embedding(quick: bool) -> dict[int, float]:
    from segmote_core import SegMoTEConfig, build_segmote

    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name)
    bounds = {}
    for size in (1024, 512):
        torch.manual_seed(0)
        model = build_segmote(SegMoTEConfig(model_type="vit_b", image_size=size)).cuda().eval()
        flops = encoder_flops(model, size)
        batch = 16 if size == 1024 else 64
        x = torch.randn(batch, 3, size, size, device="cuda")
        with torch.inference_mode():
            for _ in range(2):
                model.encode(x, autocast=True)
            sync()
            times = []
            for _ in range(3 if quick else 6):
                t0 = time.perf_counter()
                model.encode(x, autocast=True)
                sync()
                times.append(time.perf_counter() - t0)
        rate = batch / statistics.median(times)
        bound = peak * 1e12 / flops if peak else float("nan")
        bounds[size] = bound
        frac = rate / bound if peak else float("nan")
        row(f"embed vit_b {size} bf16 (batch {batch})", f"{rate:.0f} slices/s",
            f"bound {bound:.0f}/s ({flops / 1e9:.0f} GFLOP/slice)" if peak else "peak unknown",
            None)
        row(f"  fraction of bf16 bound ({size})", f"{100 * frac:.0f} %" if peak else "n/a",
            ">= 50 %" if peak else "", (frac >= 0.5) if peak else None)
        del model, x
        torch.cuda.empty_cache()
    return bounds


# ------------------------------------------------------------------------------ 2. batch
def _batch(args: list[str], timeout: int = 240) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)
    return proc, time.perf_counter() - t0


def _slices_per_s(stdout: str) -> float:
    for line in stdout.splitlines():
        if "then" in line and "slices/s" in line:
            return float(line.rsplit("then", 1)[1].split("slices/s")[0])
    return float("nan")


class GpuSampler:
    """``nvidia-smi`` utilisation every 200 ms while a run lasts."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except Exception:  # noqa: BLE001 - no nvidia-smi: no samples
                return
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def busy(self) -> str:
        s = [v for v in self.samples if v > 0]
        return f"{statistics.median(s):.0f} % median busy" if s else "no samples"


def labels_of(out: Path) -> dict[str, np.ndarray]:
    import zarr

    root = zarr.open_group(str(out), mode="r")
    return {name: np.asarray(g["labels"][...]) for name, g in root.groups()}


def check_batch(work: Path, bounds: dict[int, float], quick: bool) -> None:
    from pipeline.synthetic import synthetic_cohort

    # (a) the demo model: GPU labels equal the CPU run's within bf16 tolerance
    demo = work / "demo.zarr"
    synthetic_cohort(demo, 4, 8, 256, seed=3)
    cpu, t_cpu = _batch([str(demo), str(work / "cpu.zarr"), "--gpus-per-actor", "0",
                         "--num-actors", "1"])
    gpu, _ = _batch([str(demo), str(work / "gpu.zarr"), "--gpus-per-actor", "1",
                     "--num-actors", "1", "--batch-size", "16"])
    if cpu.returncode or gpu.returncode:
        row("batch demo model CPU vs GPU", f"exit {cpu.returncode}/{gpu.returncode}", "0/0",
            False, mismatch=True)
        sys.stderr.write(cpu.stderr[-2000:] + gpu.stderr[-2000:])
    else:
        a, b = labels_of(work / "cpu.zarr"), labels_of(work / "gpu.zarr")
        dice = []
        agree = []
        for case in a:
            x, y = a[case] > 0, b[case] > 0
            s = x.sum() + y.sum()
            dice.append(1.0 if s == 0 else 2 * np.logical_and(x, y).sum() / s)
            agree.append(float((a[case] == b[case]).mean()))
        ok = min(dice) >= 0.98 and min(agree) >= 0.99
        row("batch demo model: GPU vs CPU labels", f"Dice min {min(dice):.4f}, "
            f"voxels {100 * min(agree):.2f} %", ">= 0.98, >= 99 %", ok, mismatch=True)
        row("  GPU run slices/s (demo model)", f"{_slices_per_s(gpu.stdout):.1f}", "", None)
    # (b) vit_b at 1024 px, random weights recorded as trained: throughput and utilisation
    from segmote_core import SegMoTEConfig, build_segmote, save_segmote

    torch.manual_seed(0)
    model = build_segmote(SegMoTEConfig(model_type="vit_b"))
    ckpt = save_segmote(model, work / "vitb.safetensors", include_base=True,
                        training={"note": "random weights standing in for a trained model "
                                          "(GPU throughput check)"})
    big = work / "big.zarr"
    synthetic_cohort(big, 8 if quick else 16, 64, 512, seed=4)
    with GpuSampler() as sampler:
        proc, _ = _batch([str(big), str(work / "big_out.zarr"), "--segmote-checkpoint",
                          str(ckpt), "--gpus-per-actor", "1", "--precision", "bf16",
                          "--batch-size", "32"], timeout=400)
    if proc.returncode:
        row("batch vit_b 1024 bf16", f"exit {proc.returncode}", "0", False, mismatch=True)
        sys.stderr.write(proc.stderr[-3000:])
        return
    rate = _slices_per_s(proc.stdout)
    bound = bounds.get(1024, float("nan"))
    target = 0.4 * bound if bound == bound else 320.0  # NaN: unknown peak, the H200 figure
    row("batch vit_b 1024 bf16 (GPU actors)", f"{rate:.0f} slices/s",
        f">= {target:.0f} (40 % of bound)", rate >= target)
    row("  GPU utilisation during the run", sampler.busy(), "", None)


# ------------------------------------------------------------------------------ 3. training
def check_training(work: Path, quick: bool) -> None:
    from bench_training_cache import synthetic_cohort as train_cohort
    from segmote_core.config import SegMoTEConfig
    from training.dataset import build_slice_dataset
    from training.train_config import OptimConfig, TrainConfig
    from training.trainer import Trainer

    cohort = train_cohort(work / "train.zarr", cases=4, slices=16, size=256)
    config = SegMoTEConfig(model_type="vit_b", image_size=1024)
    ds = build_slice_dataset(cohort, image_size=1024, split=None)
    steps = 30 if quick else 60
    cfg = TrainConfig(model=config, optim=OptimConfig(epochs=1, steps_per_epoch=steps,
                                                      batch_size=16, lr=1e-4, lr_milestones=()),
                      output_dir=str(work / "train_run"), checkpoint_every=10_000, seed=0,
                      device="cuda", amp=True, random_encoder=True)
    trainer = Trainer(cfg, dataset=ds, resume=False)
    trainer.prepare_cache()
    t0 = time.perf_counter()
    trainer.fit(max_steps=steps, show_progress=False)
    wall = time.perf_counter() - t0
    with trainer.metrics_csv.open(newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)][5:]
    rate = 1.0 / statistics.median(seconds)
    row("training step, cached embeddings (batch 16)", f"{rate:.1f} steps/s "
        f"({steps / wall:.1f} incl. logging)", ">= 20", rate >= 20)


# ------------------------------------------------------------------------------ 4. plugin
def check_plugin(quick: bool) -> None:
    from bench_prompt import _ct_slice
    from segmote_core import SegMoTEConfig, SegMoTEPredictor, build_segmote

    image = _ct_slice()
    box = np.array([150, 150, 350, 330])
    out = {}
    for dev in ("cuda", "cpu"):
        torch.manual_seed(0)
        model = build_segmote(SegMoTEConfig(model_type="vit_b")).to(dev).eval()
        pred = SegMoTEPredictor(model)
        reps = 2 if dev == "cpu" or quick else 5
        emb = []
        for _ in range(reps + (1 if dev == "cuda" else 0)):
            t0 = time.perf_counter()
            pred.set_image(image, modality="CT")
            if dev == "cuda":
                sync()
            emb.append(time.perf_counter() - t0)
        emb = emb[1:] if dev == "cuda" else emb
        lat = []
        for _ in range(25):
            t0 = time.perf_counter()
            masks, _, _ = pred.predict(box=box)
            lat.append(time.perf_counter() - t0)
        out[dev] = (statistics.median(emb), statistics.median(lat[5:]), masks, pred.bf16)
    (e_g, p_g, m_g, bf), (e_c, p_c, m_c, _) = out["cuda"], out["cpu"]
    row("plugin embed vit_b 1024 (CUDA / CPU)", f"{1000 * e_g:.0f} ms / {1000 * e_c:.0f} ms",
        f"x{e_c / e_g:.0f} faster" + (" (bf16)" if bf else ""), None)
    row("plugin prompt latency on CUDA", f"{1000 * p_g:.1f} ms (CPU {1000 * p_c:.1f} ms)",
        "<= 15 ms", 1000 * p_g <= 15)
    s = m_g.sum() + m_c.sum()
    dice = 1.0 if s == 0 else 2 * np.logical_and(m_g, m_c).sum() / s
    row("plugin mask CUDA vs CPU (Dice)", f"{dice:.4f}", ">= 0.95", dice >= 0.95, mismatch=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", nargs="*", default=(),
                    choices=("embedding", "batch", "training", "plugin"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.stderr.write(f"gpu_check: no CUDA device visible to torch {torch.__version__} "
                         f"(CUDA build {torch.version.cuda}): nothing to check here; run it on "
                         f"a machine with an NVIDIA GPU\n")
        return 3
    name = torch.cuda.get_device_name(0)
    cap = torch.cuda.get_device_capability(0)
    row("GPU", f"{name} (sm_{cap[0]}{cap[1]})", f"bf16 peak {peak_tflops(name)} TFLOP/s", None)
    bounds: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="segmote_gpu_check_") as tmp:
        work = Path(tmp)
        for part, fn in (("embedding", lambda: bounds.update(check_embedding(args.quick))),
                         ("batch", lambda: check_batch(work, bounds, args.quick)),
                         ("training", lambda: check_training(work, args.quick)),
                         ("plugin", lambda: check_plugin(args.quick))):
            if part in args.skip:
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one part failing still prints the rest
                row(f"{part}: ERROR", f"{type(exc).__name__}: {str(exc)[:120]}", "", False,
                    mismatch=True)
            sys.stderr.write(f"gpu_check: {part} done in {time.perf_counter() - t0:.0f} s\n")
    widths = [max(len(r[i]) for r in ROWS + [("check", "value", "target", "status")])
              for i in range(4)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(("check", "value", "target", "status"),
                                                   widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in ROWS]
    sys.stdout.write(f"SegMoTE GPU check, {time.strftime('%Y-%m-%d %H:%M')}, "
                     f"torch {torch.__version__}\n" + "\n".join(lines) + "\n")
    if FAILED:
        sys.stdout.write(f"MISMATCH or error: {', '.join(FAILED)}\n")
        return 1
    if MISSED:
        sys.stdout.write(f"targets missed: {', '.join(MISSED)}\n")
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
