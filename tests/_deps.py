"""Dev dependencies that a test needs: skip where one is missing, but FAIL under ``CI=true``.

A silent skip in CI hides a test that never runs (a missing package, a missing browser), so CI
(``.ci/run`` exports ``CI=true``) turns each such skip into a failure that names what is missing.
Locally, a developer without the dependency still gets a skip with the same reason (``-rs``).

>>> from _deps import require                         # doctest: +SKIP
>>> transformers = require("transformers", "Hugging Face models (pip install -e '.[dev]')")
>>> chromedriver = require("chromedriver", "Debian chromium-driver (apt-get install chromium-driver)")
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from typing import Any

import pytest

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set to ``true``/``1``/``yes``): a missing dependency then fails."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> None:
    """Skip the calling test (or module) because of ``reason``; under ``CI=true`` fail with it instead."""
    caller = _caller()
    if caller is not None:  # a module-level skip is reported at this file: name the module
        reason = f"{reason} (needed by {caller})"
    if in_ci():
        pytest.fail(f"CI=true and a test dependency is missing: {reason}", pytrace=False)
    try:
        # Reported at the test (or module) that needs it, not at this helper's line.
        raise pytest.skip.Exception(reason, allow_module_level=True, _use_item_location=True)
    except TypeError:  # pragma: no cover - a pytest without that keyword
        pytest.skip(reason, allow_module_level=True)


def _caller() -> str | None:
    """``file:line`` of the module body that called into this file, or None from inside a function."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None or frame.f_code.co_name != "<module>":
        return None
    return f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"


def require(name: str, reason: str) -> Any:
    """The module ``name`` (imported) or the path of the executable ``name`` on PATH.

    Skips with ``reason`` when it is neither importable nor on PATH (or is installed without one
    of its own dependencies); under ``CI=true`` fails. Any other import error propagates.
    """
    if _MODULE.match(name):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not (name == exc.name or name.startswith(exc.name + ".")):
                # Installed, but one of its own dependencies is missing: a broken install.
                missing(f"{name} is installed but cannot import {exc.name}: {reason}")
    path = shutil.which(name)
    if path is not None:
        return path
    missing(f"{name} not found: {reason}")
    raise AssertionError("unreachable")  # pragma: no cover - skip/fail raise


def require_any(names: list[str], reason: str) -> Any:
    """The first of ``names`` found (module or executable, as :func:`require`); else skip/fail."""
    for name in names:
        if _MODULE.match(name):
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                pass
        path = shutil.which(name)
        if path is not None:
            return path
    missing(f"none of {', '.join(names)} found: {reason}")
    raise AssertionError("unreachable")  # pragma: no cover
