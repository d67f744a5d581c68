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

from healthwatch.store import Store, default_store_path, open_store

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
        if not self.root.is_dir():
            raise FileNotFoundError(f"no healthwatch store at {self.root}")
        self.runs = list(runs) if runs else None
        self.per_rank = per_rank
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        """The open store (opened on first use)."""
        if self._store is None:
            self._store = open_store(self.root)
        return self._store

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
    def snapshot(self) -> Snapshot:
        """Latest state of every run: scalars, per-layer aggregates, last step/tokens/write, alerts."""
        st = self.store
        runs: dict[str, RunState] = {}
        for run, parent, precision in st.sql("SELECT run, parent, precision FROM runs ORDER BY run").fetchall():
            if self._wanted(run):
                runs[run] = RunState(run=run, parent=parent, precision=precision)
        if not runs:
            return Snapshot(runs={}, alerts=[])
        # The latest step of each scalar, on the effective path; the run's last step, tokens and
        # write time come from the same rows.
        for run, name, value, step, tokens, wall in st.sql(
            """
            SELECT run, name, arg_max(value, step), max(step), arg_max(tokens, step), max(wall_time)
            FROM scalars_effective GROUP BY run, name
            """
        ).fetchall():
            rs = runs.get(run)
            if rs is None:
                continue
            rs.scalars[name] = _float(value)
            if rs.last_step is None or step > rs.last_step:
                rs.last_step, rs.last_tokens = int(step), int(tokens)
            if wall is not None and (rs.last_write is None or wall > rs.last_write):
                rs.last_write = float(wall)
        for run, metric, step, tokens, vmax, vmed, argmax, n in st.sql(
            """
            WITH last AS (
                SELECT run, metric, max(step) AS step FROM layer_stats_effective GROUP BY run, metric
            )
            SELECT l.run, l.metric, l.step, max(l.tokens), max(l.value), median(l.value),
                   arg_max(l.layer, l.value), count(*)
            FROM layer_stats_effective l JOIN last USING (run, metric, step)
            GROUP BY l.run, l.metric, l.step
            """
        ).fetchall():
            rs = runs.get(run)
            if rs is None:
                continue
            rs.layers[metric] = LayerAggregate(metric, int(step), _float(vmax), _float(vmed),
                                               -1 if argmax is None else int(argmax), int(n))
            if rs.last_step is None or step > rs.last_step:
                rs.last_step, rs.last_tokens = int(step), int(tokens)
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
        return Snapshot(runs=runs, alerts=alerts)

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


def _float(v: Any) -> float:
    """A stored value as float (NULL becomes NaN; NaN and ±Inf stay as they are)."""
    return math.nan if v is None else float(v)
