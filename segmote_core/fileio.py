"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one, and a
crash or power loss right after the call returns cannot leave a truncated file under the name.

Every writer of the package goes through here. The recipe: write to a temporary name in the same
folder (a rename is only atomic within one file system), ``fsync`` what was written, rename it over
the target, then ``fsync`` the folder so the rename itself is on disk. The result has mode
``0o666`` filtered by the process umask, like any file ``open(path, "w")`` creates, whatever mode
the writer gave it, so outputs shared with a group stay readable (``tempfile.mkstemp`` and
safetensors create 0600 files).
A failure anywhere leaves the previous file untouched and removes the temporary one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_dir", "file_sha256", "fsync_dir"]


def _temp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the data is synced anyway
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a new empty file beside ``path``, then put it in place.

    Args:
        write: writes the whole content to the path it is given (it may truncate or replace the
            file there).
        suffix: end of the temporary name, for writers that choose the format by suffix
            (e.g. ``".tmp.nii.gz"``).
    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = _temp_name(path, suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 & ~umask, read without touching the umask
    try:
        write(str(tmp))
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors) make it 0600
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding))


def atomic_write_dir(path: str | Path, write: Callable[[str], None]) -> Path:
    """Like :func:`atomic_write` for a folder (a zarr store): ``write(tmp_dir)`` fills a new
    folder beside ``path``; every file in it is synced, then it replaces ``path``.

    An existing ``path`` is first renamed aside and deleted only once the new folder is in place;
    if that second rename fails the old folder is put back.
    """
    path = Path(path)
    tmp = _temp_name(path, ".tmp")
    os.mkdir(tmp)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o777 & ~umask
    old: Path | None = None
    try:
        write(str(tmp))
        os.chmod(tmp, mode)
        for root, dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(root, name))
            for name in dirs:
                fsync_dir(os.path.join(root, name))
        fsync_dir(tmp)
        if path.exists() or path.is_symlink():
            old = _temp_name(path, ".old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    return path


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]
