"""Which device to run on and whether it computes bf16 natively: one answer for the plugin,
the pipeline's actors and training.

``torch.cuda.is_bf16_supported()`` also says yes on GPUs that only emulate bf16 (V100, T4:
compute capability 7.x), where bf16 autocast is slower than fp32; here bf16 counts only where
the hardware has it: CUDA compute capability >= 8.0 (A100, L4, H100, H200...), or a CPU with
AVX512-BF16 or AMX.
"""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["DEVICE_CHOICES", "available_devices", "best_device", "resolve_device", "bf16_native",
           "cpu_bf16_native", "configure_cuda"]

log = logging.getLogger(__name__)

#: What a user may ask for: ``auto`` is CUDA, then Apple's MPS, then the CPU.
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def best_device() -> torch.device:
    """CUDA (device 0) if a GPU is usable, else MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_devices() -> tuple[str, ...]:
    """The choices this machine offers, ``"auto"`` first and ``"cpu"`` last."""
    return ("auto",) + (("cuda",) if torch.cuda.is_available() else ()) + (
        ("mps",) if _mps_available() else ()) + ("cpu",)


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / ``None`` -> :func:`best_device`; a named device is checked to be usable.

    Raises:
        ValueError: an unknown name, or a device this machine does not have (the message says
            what it has).
    """
    if choice is None or str(choice) == "auto":
        return best_device()
    dev = torch.device(choice)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r}: CUDA is not available here (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use 'auto' "
                         f"or 'cpu'")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {choice!r}: Apple MPS is not available here; use 'auto' or "
                         f"'cpu'")
    if dev.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device {choice!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    return dev


@functools.lru_cache(maxsize=None)
def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) that oneDNN uses."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch: assume not
        return False
    if "AMX" in cap:
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:  # not Linux: trust the capability string (AVX512 on x86 macs/Windows)
        return "AVX512" in cap


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 in hardware (so bf16 autocast is worth it there).

    CUDA: compute capability >= 8.0 (Ampere and later); CPU: :func:`cpu_bf16_native`; MPS: no
    (bf16 support there depends on the OS version and gains little).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        major, _ = torch.cuda.get_device_capability(dev.index if dev.index is not None else 0)
        return major >= 8
    if dev.type == "cpu":
        return cpu_bf16_native()
    return False


_CONFIGURED = False


def configure_cuda() -> None:
    """Process-wide CUDA settings, once: TF32 matmuls and convolutions for the fp32 parts
    (decoder, losses: 10-bit mantissa inputs, fp32 accumulation, well inside what masks
    need) and cuDNN autotuning (input sizes are fixed per model, so the search pays once)."""
    global _CONFIGURED
    if _CONFIGURED or not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    _CONFIGURED = True
