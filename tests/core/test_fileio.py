"""The one atomic write (segmote_core.fileio) and the writers that use it: content, the mode the
umask gives, the old file kept when a write fails, nothing left behind, data synced."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from segmote_core import fileio
from segmote_core.fileio import atomic_write, atomic_write_dir, atomic_write_text
from segmote_core.io import write_labels


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_text_content_and_mode_follow_umask(tmp_path, umask_027):
    out = atomic_write_text(tmp_path / "a.json", '{"x": 1}')
    assert json.loads(out.read_text()) == {"x": 1}
    assert _mode(out) == 0o640            # 0o666 & ~umask, not mkstemp's 0o600
    os.umask(0o002)
    atomic_write_text(out, "2")
    assert out.read_text() == "2" and _mode(out) == 0o664
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    target = atomic_write_text(tmp_path / "state.pt", "old")

    def half_then_crash(tmp: str) -> None:
        Path(tmp).write_text("new but half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_file_and_folder_are_synced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                      else str(fd))
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", spy)
    target = atomic_write_text(tmp_path / "r.csv", "a,b\n")
    if os.path.exists("/proc/self/fd"):
        assert any(Path(s).name.startswith(".r.csv.") for s in synced)   # the data, before rename
        assert str(tmp_path) in synced                                    # the rename
    assert len(synced) >= 2 and target.read_text() == "a,b\n"


def test_folder_replaced_whole_or_not_at_all(tmp_path, umask_027):
    def fill(text):
        def write(tmp: str) -> None:
            Path(tmp, "sub").mkdir()
            Path(tmp, "sub", "chunk").write_text(text)
        return write

    store = atomic_write_dir(tmp_path / "s.zarr", fill("v1"))
    assert (store / "sub" / "chunk").read_text() == "v1" and _mode(store) == 0o750

    def crash(tmp: str) -> None:
        fill("v2")(tmp)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write_dir(store, crash)
    assert (store / "sub" / "chunk").read_text() == "v1"
    atomic_write_dir(store, fill("v2"))
    assert (store / "sub" / "chunk").read_text() == "v2"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["l.nii.gz", "l.nii", "l.tif", "l.png", "l.zarr"])
def test_label_writers_respect_umask_and_keep_old_on_error(tmp_path, umask_027, name):
    from segmote_core.io import open_image

    labels = np.zeros((2, 6, 5) if name != "l.png" else (6, 5), np.uint8)
    labels[..., 1:3, 2:4] = 3
    out = write_labels(labels, tmp_path / name)
    assert _mode(out) == (0o750 if out.is_dir() else 0o640)
    np.testing.assert_array_equal(np.asarray(open_image(out).data), labels)
    with pytest.raises(TypeError):
        write_labels(labels.astype(np.float32), out)       # refused: the old labels stay
    np.testing.assert_array_equal(np.asarray(open_image(out).data), labels)
    assert _leftovers(tmp_path) == []


def test_training_writers_respect_umask(tmp_path, umask_027):
    from training.precompute import FeatureCache

    cache = FeatureCache(torch.zeros(2, 4, 2, 2), None, {"k": "v"})
    path = cache.save(tmp_path / "f.safetensors")
    assert _mode(path) == 0o640
    assert FeatureCache.load(path, {"k": "v"}).image_embeddings.shape == (2, 4, 2, 2)
