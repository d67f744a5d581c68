"""Named extension points: how a lower layer uses a higher one without importing it.

The Monitor (``healthwatch.hooks``) must not import the alert engine nor the demo, yet
``Monitor(alerts="default")`` should build an alert evaluator and ``mon.watch(demo_model)`` should
find the demo's adapter. Both are looked up here by group and name, and imported only when used:

- :data:`AFTER_FLUSH`: factories ``f(spec, store_root, run) -> object with after_flush(root, run)``;
  ``"rules"`` (wired in ``healthwatch/__init__``) builds the alert evaluator from rule files.
- :data:`ADAPTERS`: adapter classes (``matches``/``inspect``) that ``auto_adapter`` tries before the
  generic fallback; ``"reference"`` is the demo model's adapter.

A target is a callable or a ``"module:attr"`` string (imported on first use). Third-party packages
add to a group with a Python entry point of the same group name, e.g. in their ``pyproject.toml``::

    [project.entry-points."healthwatch.adapters"]
    mymodel = "mypkg.hw:MyAdapter"

This module is stdlib only and imports nothing from healthwatch, so any layer may use it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

AFTER_FLUSH = "healthwatch.after_flush"
"""Group of after-flush factories ``f(spec, store_root, run)`` (``"rules"``: the alert evaluator)."""

ADAPTERS = "healthwatch.adapters"
"""Group of model adapter classes tried by ``healthwatch.hooks.adapters.auto_adapter``."""

_lock = threading.Lock()
_registry: dict[str, dict[str, str | Callable[..., Any]]] = {}


def register(group: str, name: str, target: str | Callable[..., Any]) -> None:
    """Register ``target`` (a callable or a ``"module:attr"`` string) as ``name`` in ``group``.

    Registering a name again replaces it (a test or a user may override a built-in).
    """
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"plugin target for {group}/{name} must be 'module:attr', got {target!r}")
    with _lock:
        _registry.setdefault(group, {})[name] = target


def _import(group: str, name: str, target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"plugin {group}/{name} -> {target!r} could not be loaded: {exc}") from exc
    return obj


def _entry_points(group: str) -> dict[str, str]:
    try:
        return {ep.name: ep.value for ep in entry_points(group=group)}
    except Exception:  # noqa: BLE001 - broken metadata of an unrelated package must not break lookups
        return {}


def names(group: str) -> list[str]:
    """Names known in ``group``: registered ones first, then installed entry points."""
    with _lock:
        known = list(_registry.get(group, {}))
    return known + [n for n in _entry_points(group) if n not in known]


def resolve(group: str, name: str) -> Any:
    """The object registered as ``name`` in ``group`` (imported now if it was a string).

    Raises ``LookupError`` naming the group and what it holds when ``name`` is unknown, and
    ``ImportError`` naming the target when it cannot be imported.
    """
    with _lock:
        target = _registry.get(group, {}).get(name)
    if target is None:
        target = _entry_points(group).get(name)
    if target is None:
        raise LookupError(f"no plugin {name!r} in {group}; known: {names(group) or 'none'}")
    if isinstance(target, str):
        obj = _import(group, name, target)
        with _lock:  # keep the imported object: later lookups skip the import machinery
            if _registry.get(group, {}).get(name) == target:
                _registry[group][name] = obj
        return obj
    return target


def load_all(group: str) -> list[tuple[str, Any]]:
    """Every ``(name, object)`` of ``group``, in :func:`names` order, imported now.

    A plugin that cannot be imported raises ``ImportError`` naming it: skipping it silently would
    leave a model "unsupported" for no visible reason.
    """
    return [(n, resolve(group, n)) for n in names(group)]
