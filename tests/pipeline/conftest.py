"""Fixtures shared by the pipeline tests: one tiny SegMoTE checkpoint on disk for the session.

The checkpoint is read-only to every test (a test that needs another model saves its own with
``helpers.tiny_checkpoint``); cohorts differ per module (size, slices, a corrupt case), so each
module builds the one it needs from ``helpers.make_cohort``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.helpers import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint_file(tmp_path_factory) -> Path:
    """The real tiny SegMoTE (random weights, 128 px, seed 0) saved with ``save_segmote`` and
    recorded as trained, so prompt-free runs accept it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("pipeline_model") / "tiny.safetensors")
