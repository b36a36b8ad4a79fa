"""Fixtures of the napari plugin tests."""

from __future__ import annotations

import pytest
import torch

from segmote_core import SegMoTEConfig, build_segmote

from tests.napari.helpers import open_annotator


@pytest.fixture(scope="session")
def tiny_model_shared():
    """One random-weight tiny SegMoTE at 256 px shared by the napari tests (masks are not
    meaningful; the plumbing is)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return build_segmote(SegMoTEConfig(model_type="tiny"))


@pytest.fixture
def annotator(make_napari_viewer, tiny_model_shared, qtbot):
    """(viewer, widget) with the CT phantom open, the model set and annotation started."""
    return open_annotator(make_napari_viewer, tiny_model_shared)
