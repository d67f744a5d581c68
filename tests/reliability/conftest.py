"""Fixtures for the reliability suite: real processes, real files, small filesystems.

The helpers live in ``reliability_helpers.py`` (importable by the worker scripts too); this file
puts the folder on ``sys.path`` and provides the filesystem fixtures.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reliability_helpers import SmallFs, mount_tmpfs  # noqa: E402


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A 1 MiB tmpfs mounted for the test (root + ``mount`` needed), else the test is skipped.

    The fault tests that use it also run in an ``inject`` variant that needs no mount.
    """
    fs = mount_tmpfs(tmp_path / "fs", size_kib=1024)
    if fs is None:
        pytest.skip("cannot mount a tmpfs here (needs root and mount); the injected-fault variant covers this")
    try:
        yield fs
    finally:
        fs.unmount()
