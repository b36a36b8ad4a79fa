"""One writer per store: an exclusive lock file beside the store.

``cohort.zarr`` is locked by ``cohort.zarr.lock``, a small JSON file written whole to a temporary
file and hard-linked to that name (``link`` fails when the name exists, as ``O_EXCL`` does, so two
processes can never both take it; and the lock is never seen empty, also when its writer is killed
while taking it). Where the file system has no hard links, ``O_EXCL`` creation is used. It
names its holder: host, process id, the process's start time (so a reused pid is not taken for the
holder), what it is doing and since when. A second writer gets :class:`StoreLockedError` naming
the holder. A lock whose holder is gone is *stale*:

- same host, and no process with that pid (or a process with that pid that started at another
  time): the lock is removed, with a warning that says whose it was, and taken;
- another host: this machine cannot tell whether the holder still runs, so the error says so
  and how to remove the lock by hand once it is sure.

The lock lives beside the store (not inside it) so it can be taken before the store exists and so
no name inside a store is taken from case ids.

```python
with StoreLock("labels.zarr", "segmote batch"):
    ...  # the only writer of labels.zarr
```
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["StoreLock", "StoreLockedError", "lock_path", "read_lock"]

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# this host in temporary file names (a pid means nothing on another host)
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


class StoreLockedError(RuntimeError):
    """Another process holds the store's lock (the message names it and what to do)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def lock_path(store: str | Path) -> Path:
    """The lock file of ``store``: ``<store>.lock`` beside it (symlinks resolved, so two
    names of one store share one lock)."""
    store = Path(store).resolve()
    return store.with_name(store.name + LOCK_SUFFIX)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_time(pid)
    return not (started and now and now != started)


def read_lock(path: str | Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file; ``{}`` when unreadable, ``None`` when absent."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown process (the lock file is empty or unreadable)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(
        since, (int, float)) else "?"
    return (f"{holder.get('purpose', 'a writer')} (pid {holder.get('pid')} on host "
            f"{holder.get('host')}, since {when})")


class StoreLock:
    """An exclusive lock on one store (a context manager; :meth:`release` also works).

    Args:
        store: the store's path (need not exist yet; missing parent folders are created).
        purpose: what the holder does, shown to a second writer (``"segmote batch"``).
    Raises:
        StoreLockedError: another live process holds it, or its holder cannot be checked.
        OSError: the lock file cannot be created (read-only folder, disk full): the message
            names it.
    """

    def __init__(self, store: str | Path, purpose: str) -> None:
        self.store = Path(store)
        self.path = lock_path(store)
        self.purpose = purpose
        self.token = secrets.token_hex(8)
        self.held = False
        self.pid = os.getpid()  # a forked child's copy never releases its parent's lock
        self._acquire()

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
                "purpose": self.purpose, "since": time.time(), "token": self.token,
                "store": str(self.store.resolve())}

    def _acquire(self) -> None:
        try:  # the store's folder, as the store itself would create it
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot create the folder of {self.store} "
                                       f"({exc.strerror})") from exc
        self._sweep_temps()
        for _ in range(5):
            if self._publish():
                self.held = True
                return
            self._handle_existing()
        raise StoreLockedError(f"{self.store}: could not take the lock {self.path} (another "
                               f"process keeps taking it); retry")

    def _temp_name(self, pid: int) -> Path:
        return self.path.with_name(f".{self.path.name}.{_HOST_TAG}.{pid}.{self.token}.tmp")

    def _publish(self) -> bool:
        """Create the lock file whole, or report that it exists (``False``).

        The record is written and fsynced to a temporary file first, then hard-linked to the
        lock's name: ``link`` fails if the name exists, as ``O_EXCL`` does, and the lock is
        never seen empty, not by a reader polling it, nor after this process is killed
        mid-write (an empty lock would block every later writer as 'unknown')."""
        temp = self._temp_name(os.getpid())
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:  # read-only or missing folder, disk full, permissions
            raise type(exc)(exc.errno, f"cannot create the lock file {self.path} "
                                       f"({exc.strerror}): is the folder writable?") from exc
        try:
            try:
                os.write(fd, json.dumps(self._record()).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temp, self.path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise type(exc)(exc.errno, f"cannot create the lock file {self.path} "
                                               f"({exc.strerror})") from exc
                return self._publish_without_links(temp)
            return True
        finally:
            temp.unlink(missing_ok=True)

    def _publish_without_links(self, temp: Path) -> bool:
        """File systems without hard links: ``O_EXCL`` create, then write (a short window in
        which the lock is empty remains there)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, temp.read_bytes())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return True

    def _sweep_temps(self) -> None:
        """Remove the temporary records of writers of this machine killed while taking the
        lock (they never became the lock; nobody else removes them)."""
        for temp in self.path.parent.glob(f".{self.path.name}.{_HOST_TAG}.*.tmp"):
            try:
                pid = int(temp.name.rsplit(".", 3)[-3])
            except ValueError:
                continue
            if not _alive(pid, None):
                temp.unlink(missing_ok=True)

    def _handle_existing(self) -> None:
        """Remove a stale lock (its holder is gone) or raise naming the live holder."""
        holder = read_lock(self.path)
        if holder is None:  # released meanwhile
            return
        who = _describe(holder)
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if holder and same_host and isinstance(pid, int):
            if pid == os.getpid() and holder.get("started") == _start_time(pid):
                raise StoreLockedError(
                    f"{self.store} is already being written by this process ({who}); one "
                    f"writer per store", holder)
            if not _alive(pid, holder.get("started")):
                self._remove_stale(holder, who)
                return
            raise StoreLockedError(
                f"{self.store} is locked by {who}: one writer per store; wait for it to finish "
                f"(or stop it), then rerun", holder)
        hint = (f"if no such process runs on {holder.get('host')}, delete {self.path} and rerun"
                if holder else f"if no other writer runs, delete {self.path} and rerun")
        raise StoreLockedError(f"{self.store} is locked by {who}, which this machine cannot "
                               f"check: {hint}", holder)

    def _remove_stale(self, holder: dict[str, Any], who: str) -> None:
        # Move it aside first and check what was moved: if another process replaced the stale
        # lock by its own meanwhile, put that one back instead of deleting it.
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_lock(aside) != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        log.warning("%s: removed a stale lock of %s: that process no longer runs (it was "
                    "killed or crashed); its unfinished work is redone", self.store, who)

    def release(self) -> None:
        """Remove the lock file, if it is still this lock's."""
        if not self.held or os.getpid() != self.pid:
            return
        self.held = False
        holder = read_lock(self.path)
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten release still frees the store at exit
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
