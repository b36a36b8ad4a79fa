"""SegMoTE core: model, predictor, medical I/O, volumes and embedding cache.

Imports no Qt, napari or Ray. Heavy submodules load on first attribute access, so
``import segmote_core`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SegMoTEConfig": "config",
    "ENCODER_PRESETS": "config",
    "build_segmote": "build",
    "build_sam": "build",
    "load_model": "build",
    "load_demo_model": "build",
    "demo_model_path": "build",
    "save_segmote": "checkpoint",
    "load_segmote": "build",
    "CheckpointError": "checkpoint",
    "SegMoTEMismatchError": "errors",
    "EmbeddingCacheMismatchError": "errors",
    "SegMoTEPredictor": "predictor",
    "Prediction": "predictor",
    "segment_batch": "inference",
    "AnnotationSession": "session",
    "EmbeddingStore": "embeddings",
    "normalize_intensity": "transforms",
    "CancelToken": "progress",
    "Cancelled": "progress",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'segmote_core' has no attribute {name!r}")
