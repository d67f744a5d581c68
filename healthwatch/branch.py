"""Lineage of ablation branches: helpers for trainers that branch a run, and the tree of a run.

A branch run (e.g. a BF16 segment cut from a checkpoint of an NVFP4 run) records its ``parent``,
``branch_step`` and ``branch_tokens``, its own ``precision`` and its full ``config``; the
difference against the parent's config is derived when read, never stored, so it can't go stale.

Trainer side::

    from healthwatch.branch import branch_monitor_kwargs
    kw = branch_monitor_kwargs("hw-store", parent="ultra-nvfp4", branch_step=5000,
                               precision="bf16", config_overrides={"precision": "bf16"})
    mon = hw.Monitor(store="hw-store", run="ultra-bf16-5k", **kw)

Read side: :func:`lineage_tree` (the whole tree of a run with each branch's config diff).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from healthwatch import query
from healthwatch.store import Store

ChangeKind = Literal["added", "removed", "changed"]


@dataclass(frozen=True)
class ConfigChange:
    """One difference between a parent's and a branch's config (dotted ``key``; None when absent)."""

    key: str
    kind: ChangeKind
    parent: Any = None
    child: Any = None

    def __str__(self) -> str:
        if self.kind == "added":
            return f"+{self.key}={self.child!r}"
        if self.kind == "removed":
            return f"-{self.key} (was {self.parent!r})"
        return f"{self.key}: {self.parent!r} -> {self.child!r}"


def _as_config(config: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if config is None or config == "":
        return {}
    if isinstance(config, str):
        try:
            loaded = json.loads(config)
        except ValueError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from exc
        return loaded if isinstance(loaded, dict) else {"value": loaded}
    return dict(config)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(
    parent_config: Mapping[str, Any] | str | None,
    child_config: Mapping[str, Any] | str | None,
    *,
    ignore: Iterable[str] = (),
) -> list[ConfigChange]:
    """Differences between two configs (dicts or JSON strings), nested keys flattened with dots.

    Lists compare as whole values. Keys under any prefix in ``ignore`` (e.g. ``"healthwatch"``,
    the adapter facts the Monitor adds) are skipped. Sorted by key.

    >>> [str(c) for c in config_diff({"opt": {"lr": 1e-3}, "precision": "nvfp4"}, {"opt": {"lr": 1e-3}, "precision": "bf16"})]
    ["precision: 'nvfp4' -> 'bf16'"]
    """
    a, b = _flatten(_as_config(parent_config)), _flatten(_as_config(child_config))
    skip = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in skip)

    changes: list[ConfigChange] = []
    for key in sorted(set(a) | set(b)):
        if ignored(key):
            continue
        if key not in a:
            changes.append(ConfigChange(key, "added", None, b[key]))
        elif key not in b:
            changes.append(ConfigChange(key, "removed", a[key], None))
        elif a[key] != b[key]:
            changes.append(ConfigChange(key, "changed", a[key], b[key]))
    return changes


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _with_store(store: Store | str | os.PathLike[str]) -> tuple[Store, bool]:
    if isinstance(store, Store):
        return store, False
    return Store(store), True


def branch_point(store: Store, parent: str, branch_step: int) -> tuple[int, int]:
    """``(step, tokens)`` of the parent's last effective logged step at or before ``branch_step``.

    Superseded rows of a rolled-back attempt are ignored: a branch continues the parent's
    effective path. Raises ``LookupError`` when the parent is unknown or logged nothing that early.
    """
    row = store.sql(
        "SELECT max(step), arg_max(tokens, step) FROM scalars_effective WHERE run = ? AND step <= ?",
        [parent, int(branch_step)],
    ).fetchone()
    if row is None or row[0] is None:
        known = store.sql("SELECT count(*) FROM runs WHERE run = ?", [parent]).fetchone()
        if not known or not known[0]:
            raise LookupError(f"parent run {parent!r} is not in the store {store.root}")
        raise LookupError(f"parent run {parent!r} logged no step at or before step {branch_step}")
    return int(row[0]), int(row[1])


def branch_monitor_kwargs(
    store: Store | str | os.PathLike[str],
    parent: str,
    branch_step: int,
    *,
    precision: str = "bf16",
    config_overrides: Mapping[str, Any] | None = None,
    inherit_config: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for ``Monitor(...)`` of a branch cut from ``parent`` at ``branch_step``.

    Returns ``{"parent", "branch_step", "branch_tokens", "precision", "config"}``:
    ``branch_tokens`` is the parent's token count at its last logged step ≤ ``branch_step`` on its
    effective path (so the branch lines up on the tokens axis even when the trainer cannot tell),
    and ``config`` is the parent's config with ``config_overrides`` merged in (when
    ``inherit_config``), so :func:`config_diff` shows exactly what the branch changed.

    Raises ``LookupError`` when the parent is not in the store or has no step that early.
    """
    st, owned = _with_store(store)
    try:
        _step, tokens = branch_point(st, parent, branch_step)
        row = st.sql("SELECT config FROM runs WHERE run = ?", [parent]).fetchone()
    finally:
        if owned:
            st.close()
    base = _as_config(row[0] if row else None) if inherit_config else {}
    # The Monitor rewrites its own "healthwatch" facts (adapter, layers) when it watches the model.
    base.pop("healthwatch", None)
    config = _deep_merge(base, dict(config_overrides or {}))
    return {
        "parent": parent,
        "branch_step": int(branch_step),
        "branch_tokens": tokens,
        "precision": precision,
        "config": config,
    }


#: Columns of :func:`lineage_tree`.
TREE_SCHEMA: dict[str, Any] = {
    "run": pl.Utf8,
    "parent": pl.Utf8,
    "depth": pl.Int64,
    "precision": pl.Utf8,
    "parent_precision": pl.Utf8,
    "branch_step": pl.Int64,
    "branch_tokens": pl.Int64,
    "missing_parent": pl.Boolean,
    "config_changes": pl.Int64,
    "config_diff": pl.Utf8,
}


def lineage_tree(store: Store, run: str, *, ignore: Iterable[str] = ("healthwatch",)) -> pl.DataFrame:
    """The whole tree containing ``run`` (root ancestor and all descendants), one row per run.

    Columns (:data:`TREE_SCHEMA`): ``run, parent, depth, precision, parent_precision, branch_step,
    branch_tokens, missing_parent, config_changes, config_diff`` where ``config_diff`` is a
    ``"; "``-joined rendering of :func:`config_diff` against the parent (keys under ``ignore``
    skipped) and ``missing_parent`` flags a branch whose recorded parent is not in the store (its
    tree then starts at the branch). Rows come depth first (parents before their branches),
    siblings ordered by branch tokens. Empty when ``run`` is not in the store.
    """
    tree = query.lineage(store, run)
    if tree.height == 0:
        return pl.DataFrame(schema=TREE_SCHEMA)
    names = tree["run"].to_list() + [p for p in tree["parent"].to_list() if p is not None]
    rows = store.sql(
        "SELECT run, config, precision FROM runs WHERE list_contains(?, run)", [list(dict.fromkeys(names))]
    ).fetchall()
    configs = {r[0]: r[1] for r in rows}
    precisions = {r[0]: r[2] for r in rows}
    skip = tuple(ignore)
    diffs: list[str | None] = []
    counts: list[int | None] = []
    for rec in tree.iter_rows(named=True):
        parent = rec["parent"]
        if parent is None or parent not in configs:
            diffs.append(None)
            counts.append(None)
            continue
        try:
            changes = config_diff(configs[parent], configs[rec["run"]], ignore=skip)
        except ValueError as exc:  # a hand-written config that is not JSON: say so in the cell
            diffs.append(f"(unreadable config: {exc})")
            counts.append(None)
            continue
        diffs.append("; ".join(map(str, changes)))
        counts.append(len(changes))
    out = tree.with_columns(
        pl.Series("parent_precision", [precisions.get(p) if p else None for p in tree["parent"]], dtype=pl.Utf8),
        pl.Series("config_changes", counts, dtype=pl.Int64),
        pl.Series("config_diff", diffs, dtype=pl.Utf8),
    )
    return _depth_first(out.select(list(TREE_SCHEMA)).cast(TREE_SCHEMA))  # type: ignore[arg-type]


def _depth_first(tree: pl.DataFrame) -> pl.DataFrame:
    """Order rows so that each run is directly followed by its subtree (for indented display)."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    names = set(tree["run"])
    for rec in tree.sort(["branch_tokens", "branch_step", "run"], nulls_last=True).iter_rows(named=True):
        by_parent.setdefault(rec["parent"] if rec["parent"] in names else None, []).append(rec)
    ordered: list[dict[str, Any]] = []

    def walk(parent: str | None) -> None:
        for rec in by_parent.get(parent, []):
            ordered.append(rec)
            walk(rec["run"])

    walk(None)
    return pl.DataFrame(ordered, schema=tree.schema)


def orphan_branches(store: Store) -> pl.DataFrame:
    """Runs whose recorded parent is not in the store: ``(run, parent, branch_step, branch_tokens)``."""
    return store.sql(
        "SELECT run, parent, branch_step, branch_tokens FROM runs "
        "WHERE parent IS NOT NULL AND parent NOT IN (SELECT run FROM runs) ORDER BY run"
    ).pl()
