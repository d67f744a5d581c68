"""Every store read the exporters make, in one place.

The exporters (Prometheus, TensorBoard, W&B) never touch segment files or the training thread:
they read the store through its public read API (:func:`healthwatch.store.open_store` and the
``*_effective`` views, which hide rows that a later attempt superseded, i.e. they follow the
effective path through rollbacks and are unaffected by compaction). Keeping all SQL here means a
change of the read layer touches this one module.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healthwatch.store import Store, default_store_path
from healthwatch.store.fs import store_exists

#: Per-rank runs (``<run>.rank<k>``) are left out by default: they would multiply the series.
RANK_RUN = re.compile(r"\.rank\d+$")


@dataclass(frozen=True)
class LayerAggregate:
    """One layer metric of a run at its latest step: max and median over layers, and where the max is."""

    metric: str
    step: int
    max: float
    median: float
    argmax_layer: int
    layers: int


@dataclass(frozen=True)
class AlertInstance:
    """Latest recorded state of one alert instance (rule x run x layer)."""

    run: str
    alert: str
    group: str
    severity: str
    layer: int | None
    state: str
    step: int


@dataclass
class RunState:
    """What the Prometheus exporter shows for one run (latest values on the effective path)."""

    run: str
    parent: str | None = None
    precision: str | None = None
    last_step: int | None = None
    last_tokens: int | None = None
    last_write: float | None = None
    scalars: dict[str, float] = field(default_factory=dict)
    layers: dict[str, LayerAggregate] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Everything one refresh read: runs by name and alert instances."""

    runs: dict[str, RunState]
    alerts: list[AlertInstance]


class StoreSource:
    """Read side used by the exporters; holds one :class:`~healthwatch.store.Store` (thread-safe).

    ``runs`` restricts every read to those runs; per-rank runs are skipped unless ``per_rank``.
    """

    def __init__(self, store: str | os.PathLike[str] | None = None, runs: Sequence[str] | None = None,
                 per_rank: bool = False) -> None:
        self.root: Path = default_store_path(store)
        if not store_exists(self.root):  # a directory, or an s3:// store
            raise FileNotFoundError(f"no healthwatch store at {self.root}")
        self.runs = list(runs) if runs else None
        self.per_rank = per_rank
        self._store: Store | None = None
        # Incremental snapshot state (see snapshot()).
        self._state: dict[str, RunState] = {}
        self._scalar_steps: dict[str, dict[str, int]] = {}
        self._floor_scalars: dict[str, int] = {}
        self._floor_layers: dict[str, int] = {}
        self._attempts_seen: dict[str, tuple[tuple[int, int], ...]] = {}

    @property
    def store(self) -> Store:
        """The open store (opened on first use; its listing is refreshed by :meth:`refresh`)."""
        if self._store is None:
            # One directory listing per read of the exporter, not one per query (~80 ms each at
            # 50 runs): the exporters call refresh() at the start of each read.
            self._store = Store(self.root, auto_refresh=False)
        return self._store

    def refresh(self) -> None:
        """See the store's files as they are now (new segments, compactions)."""
        self.store.refresh()

    def close(self) -> None:
        """Close the store connection."""
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- run lists -----------------------------------------------------------------------------
    def run_names(self) -> list[str]:
        """Runs the store declares (``runs`` table), filtered like every other read."""
        names = [r[0] for r in self.store.sql("SELECT run FROM runs ORDER BY run").fetchall()]
        return [r for r in names if self._wanted(r)]

    def _wanted(self, run: str) -> bool:
        if self.runs is not None:
            return run in self.runs
        return self.per_rank or not RANK_RUN.search(run)

    def require_run(self, run: str) -> None:
        """Raise ``LookupError`` naming the known runs when ``run`` is not in the store."""
        row = self.store.sql("SELECT count(*) FROM runs WHERE run = ?", [run]).fetchone()
        if not row or not row[0]:
            known = [r[0] for r in self.store.sql("SELECT run FROM runs ORDER BY run").fetchall()]
            raise LookupError(f"run {run!r} is not in store {self.root} (runs: {', '.join(known) or 'none'})")

    def run_info(self, run: str) -> dict[str, Any]:
        """Lineage and config of ``run``: ``{run, parent, branch_step, branch_tokens, precision, config}``."""
        self.require_run(run)
        row = self.store.sql(
            "SELECT parent, branch_step, branch_tokens, precision, config FROM runs WHERE run = ?", [run]
        ).fetchone()
        assert row is not None
        try:
            config = json.loads(row[4]) if row[4] else {}
        except ValueError:
            config = {"raw": row[4]}
        return {"run": run, "parent": row[0], "branch_step": row[1], "branch_tokens": row[2],
                "precision": row[3], "config": config}

    def attempts_signature(self, run: str) -> tuple[tuple[int, int], ...]:
        """``(attempt, start_step)`` pairs of ``run``: it changes exactly when a rollback or resume starts."""
        return tuple(
            (int(a), int(s)) for a, s in self.store.sql(
                "SELECT attempt, start_step FROM attempts WHERE run = ? ORDER BY attempt", [run]
            ).fetchall()
        )

    # -- Prometheus snapshot --------------------------------------------------------------------
    def _bounds(self, runs: Sequence[str], floors: dict[str, int]) -> tuple[str, list[Any]]:
        """WHERE clause reading, per run, only steps at or after its floor (all steps without one)."""
        parts, params = [], []
        for run in runs:
            if run in floors:
                parts.append("(run = ? AND step >= ?)")
                params += [run, floors[run]]
            else:
                parts.append("run = ?")
                params.append(run)
        return " OR ".join(parts), params

    def snapshot(self) -> Snapshot:
        """Latest state of every run: scalars, per-layer aggregates, last step/tokens/write, alerts.

        Incremental: a run's rows are read from the last step seen before (inclusive, so a step
        whose tables landed in different flushes is read whole), and merged into what earlier
        calls found. A new attempt (resume or rollback) changes which rows are effective, so its
        run is then read again from the start.
        """
        st = self.store
        st.refresh()
        declared = [(r, p, pr) for r, p, pr in st.sql("SELECT run, parent, precision FROM runs ORDER BY run").fetchall()
                    if self._wanted(r)]
        if not declared:
            return Snapshot(runs={}, alerts=[])
        sigs: dict[str, list[tuple[int, int]]] = {}
        for run, attempt, start in st.sql("SELECT run, attempt, start_step FROM attempts ORDER BY run, attempt").fetchall():
            sigs.setdefault(run, []).append((int(attempt), int(start)))
        for run, _, _ in declared:
            sig = tuple(sigs.get(run, ()))
            if self._attempts_seen.get(run) != sig:  # first look, resume or rollback: read the run again
                self._attempts_seen[run] = sig
                self._state.pop(run, None)
                self._scalar_steps.pop(run, None)
                self._floor_scalars.pop(run, None)
                self._floor_layers.pop(run, None)
        runs: dict[str, RunState] = {}
        for run, parent, precision in declared:
            rs = self._state.get(run) or RunState(run=run)
            rs.parent, rs.precision = parent, precision
            runs[run] = self._state[run] = rs
        names = list(runs)
        where, params = self._bounds(names, self._floor_scalars)
        for run, name, value, step, tokens, wall in st.sql(
            "SELECT run, name, arg_max(value, step), max(step), arg_max(tokens, step), max(wall_time) "
            f"FROM scalars_effective WHERE {where} GROUP BY run, name",
            params,
        ).fetchall():
            rs = runs[run]
            steps = self._scalar_steps.setdefault(run, {})
            if step >= steps.get(name, -1):
                steps[name] = int(step)
                rs.scalars[name] = _float(value)
            if rs.last_step is None or step >= rs.last_step:
                rs.last_step, rs.last_tokens = int(step), int(tokens)
            if wall is not None and (rs.last_write is None or wall > rs.last_write):
                rs.last_write = float(wall)
            self._floor_scalars[run] = max(self._floor_scalars.get(run, 0), int(step))
        where, params = self._bounds(names, self._floor_layers)
        for run, metric, step, tokens, vmax, vmed, argmax, n in st.sql(
            f"""
            WITH b AS (SELECT run, metric, step, tokens, layer, value FROM layer_stats_effective WHERE {where}),
            last AS (SELECT run, metric, max(step) AS step FROM b GROUP BY run, metric)
            SELECT b.run, b.metric, b.step, max(b.tokens), max(b.value), median(b.value),
                   arg_max(b.layer, b.value), count(*)
            FROM b JOIN last USING (run, metric, step)
            GROUP BY b.run, b.metric, b.step
            """,
            params,
        ).fetchall():
            rs = runs[run]
            old = rs.layers.get(metric)
            if old is None or step >= old.step:
                rs.layers[metric] = LayerAggregate(metric, int(step), _float(vmax), _float(vmed),
                                                   -1 if argmax is None else int(argmax), int(n))
            if rs.last_step is None or step > rs.last_step:
                rs.last_step, rs.last_tokens = int(step), int(tokens)
            self._floor_layers[run] = max(self._floor_layers.get(run, 0), int(step))
        alerts = [
            AlertInstance(run, alert, group or "", severity or "", None if layer is None else int(layer), state, int(step))
            for run, alert, group, severity, layer, state, step in st.sql(
                """
                SELECT run, alert, "group", severity, layer, state, step FROM alerts
                QUALIFY row_number() OVER (PARTITION BY run, fingerprint ORDER BY step DESC, wall_time DESC) = 1
                ORDER BY run, alert, layer
                """
            ).fetchall()
            if run in runs
        ]
        # Copies: the caller may hand the snapshot to another thread while the next refresh runs.
        return Snapshot(runs={r: _copy(rs) for r, rs in runs.items()}, alerts=alerts)

    # -- series for the TensorBoard / W&B mirrors ------------------------------------------------
    def scalar_rows(self, run: str, after_step: int | None = None) -> list[tuple[int, int, str, float, float | None]]:
        """``(step, tokens, name, value, wall_time)`` of ``run`` on the effective path, after ``after_step``."""
        lo = -1 if after_step is None else int(after_step)
        return [
            (int(s), int(t), n, _float(v), w)
            for s, t, n, v, w in self.store.sql(
                "SELECT step, tokens, name, value, wall_time FROM scalars_effective "
                "WHERE run = ? AND step > ? ORDER BY step, name",
                [run, lo],
            ).fetchall()
        ]

    def layer_aggregate_rows(self, run: str, after_step: int | None = None) -> list[tuple[int, str, float, float, int]]:
        """``(step, metric, max, median, argmax_layer)`` per step of ``run`` (effective path), after ``after_step``."""
        lo = -1 if after_step is None else int(after_step)
        return [
            (int(s), m, _float(mx), _float(md), int(am))
            for s, m, mx, md, am in self.store.sql(
                "SELECT step, metric, max(value), median(value), arg_max(layer, value) FROM layer_stats_effective "
                "WHERE run = ? AND step > ? GROUP BY step, metric ORDER BY step, metric",
                [run, lo],
            ).fetchall()
        ]

    def last_effective_step(self, run: str) -> int | None:
        """Newest step of ``run`` on the effective path (scalars or layer stats), or None."""
        row = self.store.sql(
            "SELECT max(s) FROM (SELECT max(step) AS s FROM scalars_effective WHERE run = ? "
            "UNION ALL SELECT max(step) FROM layer_stats_effective WHERE run = ?)",
            [run, run],
        ).fetchone()
        return None if not row or row[0] is None else int(row[0])


def _copy(rs: RunState) -> RunState:
    return RunState(rs.run, rs.parent, rs.precision, rs.last_step, rs.last_tokens, rs.last_write,
                    dict(rs.scalars), dict(rs.layers))


def _float(v: Any) -> float:
    """A stored value as float (NULL becomes NaN; NaN and ±Inf stay as they are)."""
    return math.nan if v is None else float(v)
