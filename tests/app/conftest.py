"""Fixtures for the app tests: a small real store written through StoreWriter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tests_app_store import build_app_store  # noqa: E402


@pytest.fixture(scope="session")
def app_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared read-only test store (see ``tests_app_store.build_app_store``)."""
    return build_app_store(tmp_path_factory.mktemp("app") / "store")
