"""Shared fixtures: keep torch to the CI machine's two cores and give each test its own store;
under ``CI=true`` a missing dev dependency fails instead of skipping (see ``_deps.py``)."""

from __future__ import annotations

import os

import pytest
from _deps import in_ci

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

if in_ci():
    # Under CI=true nothing skips for a missing dev dependency: tests should call
    # ``_deps.require``, and an ``importorskip`` anywhere (a test written before it, or by
    # someone who did not know) fails the same way instead of skipping.
    _importorskip = pytest.importorskip

    def _importorskip_or_fail(modname: str, *args: object, **kwargs: object) -> object:
        try:
            return _importorskip(modname, *args, **kwargs)
        except pytest.skip.Exception as exc:
            pytest.fail(f"CI=true and a test dependency is missing: {exc}", pytrace=False)

    pytest.importorskip = _importorskip_or_fail


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
