#!/usr/bin/env bash
# The GPU check (docs/performance.md): embedding throughput against the GPU's bf16 peak,
# `segmote batch` with GPU actors (labels equal to the CPU run; slices/s; GPU utilisation),
# training steps on cached embeddings, and the plugin's embed/prompt latency on CUDA vs CPU.
# One table; exit 0 all equal and on target, 1 a mismatch or error, 3 no CUDA here,
# 4 equal but a target missed, 124 it ran past its time limit.
#
#   bash benchmarks/gpu_check.sh [--quick]      (about 5 minutes on an H100/H200)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch here ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)' 2>/dev/null || echo 'torch not importable')); nothing to check. Run this on a machine with an NVIDIA GPU." >&2
    exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export RAY_USAGE_STATS_ENABLED=0
timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
