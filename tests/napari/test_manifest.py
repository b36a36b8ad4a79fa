"""npe2 finds and validates the top-level napari.yaml after both editable and wheel installs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "napari.yaml"

_PROBE = r"""
import importlib.util, json, pathlib
from npe2 import PluginManifest
pm = PluginManifest.from_distribution("segmote")
pm.validate_imports()
spec = importlib.util.find_spec("napari_segmote")
path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "napari.yaml"
c = pm.contributions
print(json.dumps({"name": pm.name, "file": str(path), "resolved": str(path.resolve()),
                  "text": path.read_text(), "widgets": len(c.widgets), "readers": len(c.readers),
                  "writers": len(c.writers), "samples": len(c.sample_data)}))
"""


def _probe(env_path: str | None = None) -> dict:
    env = None
    if env_path is not None:
        import os
        env = dict(os.environ, PYTHONPATH=env_path)
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=env, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editable_install_loads_top_level_manifest():
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(_PROBE, namespace)                     # in this process: the editable install
    info = json.loads(out.getvalue().strip().splitlines()[-1])
    assert info["name"] == "segmote"
    assert Path(info["resolved"]) == MANIFEST           # the very file at the repository root
    # widgets: the annotator and the review panel
    assert (info["widgets"], info["readers"], info["writers"], info["samples"]) == (2, 1, 1, 2)
    cli = subprocess.run([sys.executable, "-m", "npe2", "validate", "segmote", "--imports"],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert cli.returncode == 0 and "valid" in cli.stdout, cli.stdout + cli.stderr


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools")
def test_wheel_install_ships_top_level_manifest(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "tests", "benchmarks",
        "docs", ".pytest_cache", "tmp", "*.zarr"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("segmote-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=600)
    shipped = site / "napari_segmote" / "napari.yaml"
    assert shipped.is_file() and not shipped.is_symlink()
    info = _probe(str(site))
    assert Path(info["resolved"]) == shipped.resolve()  # loaded from the installed copy
    assert info["text"] == MANIFEST.read_text()
    assert info["name"] == "segmote" and info["widgets"] == 2
