"""Shared fixtures: keep torch to the CI machine's two cores and give each test its own store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def store_dir(tmp_path):
    """A fresh store directory path (not created)."""
    return tmp_path / "store"
