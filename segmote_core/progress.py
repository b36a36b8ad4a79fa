"""Progress callbacks and cooperative cancellation, free of any GUI toolkit.

Long loops in ``segmote_core`` take ``progress: ProgressCallback | None`` and
``cancel: CancelToken | None``. The napari plugin adapts them to ``napari.utils.progress`` and
thread-worker aborts, the CLI to tqdm; the core never imports either.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generator, Optional, TypeVar

__all__ = ["ProgressCallback", "CancelToken", "Cancelled", "report", "callback_steps"]

T = TypeVar("T")

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


def callback_steps(run: Callable[[ProgressCallback], T]) -> Generator[tuple[int, int], None, T]:
    """Turn a function that reports ``progress(done, total)`` into a progress generator.

    ``run(progress)`` executes in a helper thread; its progress calls are yielded here (a GUI
    worker forwards them to its progress bar), its result is this generator's return value and
    its exception is re-raised here.
    """
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = run(lambda done, total: events.put((int(done), int(total))))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=target, name="segmote-steps", daemon=True)
    thread.start()
    while (item := events.get()) is not None:
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
