"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.cohorts import write_tiny_cohort


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    return write_tiny_cohort(tmp_path_factory.mktemp("training") / "cohort.zarr")
