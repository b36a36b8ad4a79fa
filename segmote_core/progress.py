"""Progress callbacks and cooperative cancellation, free of any GUI toolkit.

Long loops in ``segmote_core`` take ``progress: ProgressCallback | None`` and
``cancel: CancelToken | None``. The napari plugin adapts them to ``napari.utils.progress`` and
thread-worker aborts, the CLI to tqdm; the core never imports either.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

__all__ = ["ProgressCallback", "CancelToken", "Cancelled", "report"]

#: ``progress(done, total)``: called after each unit of work (slice, case, step).
ProgressCallback = Callable[[int, int], None]


class Cancelled(RuntimeError):
    """Raised inside a long operation once its :class:`CancelToken` was cancelled."""


class CancelToken:
    """A thread-safe flag that a GUI or a signal handler sets to stop long work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("operation cancelled")


def report(progress: Optional[ProgressCallback], done: int, total: int,
           cancel: Optional[CancelToken] = None) -> None:
    """Call ``progress`` if given, then stop with :class:`Cancelled` if ``cancel`` is set."""
    if progress is not None:
        progress(done, total)
    if cancel is not None:
        cancel.raise_if_cancelled()
