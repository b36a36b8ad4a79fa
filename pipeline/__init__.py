"""``segmote batch``: overnight prompt-free (PPT) or box-from-labels segmentation of a zarr
cohort on Ray. Imports ``segmote_core``; never the napari plugin or training code.

```python
from pipeline import BatchOptions, run_batch
summary = run_batch(BatchOptions("cohort.zarr", "labels.zarr"))
```
Submodules load on first attribute access (``segmote --help`` stays cheap); Ray itself is
imported only when a run starts.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchOptions": "runner",
    "BatchSummary": "runner",
    "run_batch": "runner",
    "OutputStoreMismatchError": "store",
    "ModelSpec": "worker",
    "PoolConfig": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
