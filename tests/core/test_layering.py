"""build -> checkpoint in one direction: checkpoint.py reads and writes state and never imports
build.py; neither uses the other's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import segmote_core

CORE = Path(segmote_core.__file__).parent


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_checkpoint_never_imports_build():
    mods = [m for m, _ in _imports(CORE / "checkpoint.py")]
    assert not [m for m in mods if m in (".build", "segmote_core.build")], mods
    code = ("import sys, segmote_core.checkpoint as c; "
            "print('segmote_core.build' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "False"


def test_no_private_names_cross():
    for a, b in (("build.py", "checkpoint"), ("checkpoint.py", "build")):
        for mod, names in _imports(CORE / a):
            if mod.endswith(b):
                assert not [n for n in names if n.startswith("_")], (a, mod, names)


def test_loading_lives_in_build():
    from segmote_core import build, checkpoint

    assert segmote_core.load_segmote is build.load_segmote
    assert not hasattr(checkpoint, "load_segmote")
