"""Shared pytest fixtures; the data they hand out is made by the helper modules ``tests/_*.py``."""
from __future__ import annotations

from pathlib import Path

import pytest
from _ensemble_data import make_env
from _image_data import make_dataset
from _tuning_data import make_heldout


@pytest.fixture
def image_dataset(tmp_path: Path) -> Path:
    """A fresh generated dataset (8 train classes x 6 images, 32 px; 3 test classes) under tmp_path/data."""
    return make_dataset(tmp_path / "data")


@pytest.fixture
def tuning_heldout():
    """Tiny 2-member HeldoutSet for the tuning tests (see ``_tuning_data.make_heldout``)."""
    return make_heldout()


@pytest.fixture
def ens_env(tmp_path: Path):
    """Ensemble test kit (see ``_ensemble_data.make_env``)."""
    return make_env(tmp_path)
