"""Shared pytest fixtures; the data they hand out is made by the helper modules ``tests/_*.py``."""
from __future__ import annotations

import socket
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


@pytest.fixture
def connects(monkeypatch) -> list:
    """Record and refuse every socket connect; the list of attempted addresses."""
    tried = []

    def refuse(self, address):
        tried.append(address)
        raise ConnectionRefusedError(111, "refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tried


@pytest.fixture
def hub(tmp_path, monkeypatch, connects) -> Path:
    """An empty hub cache (HF_HOME/hub) with HF_HUB_OFFLINE=1; returns the cache folder."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    return cache
