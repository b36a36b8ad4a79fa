"""Suite-wide set-up: GUI tests run only where there is a display.

napari needs an X display with OpenGL. pytest-xvfb starts a virtual one when the `Xvfb` binary is
installed (and sets ``DISPLAY``); without a display Qt aborts the whole process, so every test marked
``gui`` is skipped instead, with one line that says how to run them.
"""

from __future__ import annotations

import os
import shutil

import pytest

HOW_TO_RUN_GUI = ("no display: install Xvfb with Mesa GL (apt-get install xvfb libgl1-mesa-dri ...,"
                  " see README) and rerun; pytest-xvfb then starts it")


def display_available() -> bool:
    """True where Qt can open windows: an X or Wayland display is set (pytest-xvfb sets it)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def pytest_collection_modifyitems(config, items):
    if display_available():
        return
    skip = pytest.mark.skip(reason=HOW_TO_RUN_GUI)
    gui = [item for item in items if "gui" in item.keywords]
    for item in gui:
        item.add_marker(skip)
    if gui:
        config._segmote_gui_skipped = len(gui)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_segmote_gui_skipped", 0)
    if n:
        xvfb = "Xvfb is not on PATH" if shutil.which("Xvfb") is None else "DISPLAY is not set"
        terminalreporter.write_line(f"SKIPPED {n} GUI tests: {xvfb}; {HOW_TO_RUN_GUI}.")
