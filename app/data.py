"""Data access for the app: one open Store per server, queries cached per run, series read incrementally.

Three layers of caching keep a live page cheap:

* ``get_store`` opens one :class:`~healthwatch.store.Store` per path for the whole server
  (``st.cache_resource``); its ``version`` bumps when the directory listing changes.
* Per-run signatures (``run_signature``: the modification times of the run's table directories)
  key the cached queries, so a writer appending to run A never invalidates run B's charts, and a
  refresh without new segments re-reads nothing.
* Line charts read through :class:`SeriesCache`: min/max downsampling into buckets aligned on a
  fixed ladder of widths, so a refresh only re-reads the rows from the last (partial) bucket on,
  and a growing run coarsens its cached buckets in memory. Coarsening is exact: the minimum of a
  union of buckets is the minimum of their minima (likewise the maximum), so a one-step spike in
  a million steps is still drawn.

Every query is parameterised; run and metric names never become SQL text. Layer rows are read
from the base views with an attempt predicate computed from the small ``attempts`` table (see
:class:`Timeline`) instead of the ``*_effective`` join views, which lets DuckDB prune row groups of
the sorted, compacted segments.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import streamlit as st

from healthwatch import query
from healthwatch.store import ROLLUP_BUCKETS, Store, default_store_path

#: Points per drawn trace at most (a min and a max per bucket).
MAX_POINTS = 2000
#: Bucket widths, each a multiple of the one before, so cached buckets coarsen exactly; from 100
#: on they are multiples of the 100-step compaction rollup, so whole-run layer aggregates can be
#: read from the rollups instead of 10^8 raw rows.
WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64) + tuple(100 * 2**k for k in range(25))
#: Seconds after which an incremental series is re-read in full anyway (a row that arrived late
#: for an old step is then picked up).
FULL_RELOAD_S = 600.0
#: A run whose last row was written this recently counts as live.
LIVE_S = 120.0

Agg = Literal["max", "median", "mean", "min", "sum"]

_POINT_SCHEMA = {"sig": pl.Utf8, "superseded": pl.Boolean, "b": pl.Int64, "step": pl.Int64, "tokens": pl.Int64,
                 "value": pl.Float64, "attempt": pl.Int32}


# --------------------------------------------------------------------------------------------
# the store


def store_path() -> Path:
    """The store given on the command line (``-- --store S``), by ``HEALTHWATCH_STORE``, or the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return default_store_path(args.store or os.environ.get("HEALTHWATCH_STORE"))


@st.cache_resource(show_spinner=False)
def _open(path: str) -> Store:
    # get_store() refreshes once per script run; queries need not re-list the store each time.
    store = Store(path, auto_refresh=False)
    try:
        # Segments are immutable (a merge publishes a new name), so caching their Parquet footers
        # is safe; it saves ~0.15 s per query on a file with thousands of row groups.
        store.con.execute("SET parquet_metadata_cache = true")
    except Exception:  # noqa: BLE001 - an older DuckDB without the setting is only slower
        pass
    return store


def get_store(quiet: bool = False) -> Store | None:
    """The open store (refreshed), or None after showing why there is none (unless ``quiet``)."""
    path = store_path()
    if not path.is_dir():
        if not quiet:
            st.info(f"No healthwatch store at `{path}` yet. Start a run with `hw.Monitor(store=...)`, "
                    "or `healthwatch demo` for a demo store, then reload.")
        return None
    try:
        store = _open(str(path))
        store.refresh()
    except Exception as exc:  # noqa: BLE001 - a message, never a traceback
        if not quiet:
            st.error(f"Cannot open the store at `{path}`: {exc}")
        return None
    return store


def run_signature(store: Store, run: str, tables: Sequence[str] = ("scalars", "layer_stats", "attempts")) -> tuple:
    """Modification times of ``run``'s table directories: changes exactly when segments are
    published, merged or retired for that run (a cache key narrower than ``store.version``)."""
    sig: list[Any] = [str(store.root), run]
    for table in tables:
        try:
            sig.append(os.stat(store.root / f"table={table}" / f"run={run}").st_mtime_ns)
        except (FileNotFoundError, NotADirectoryError):
            sig.append(None)
    return tuple(sig)


# --------------------------------------------------------------------------------------------
# generic caching of query results


@st.cache_data(max_entries=512, show_spinner=False)
def _cached(kind: str, key: tuple, path: str, args: tuple, kwargs: tuple) -> Any:
    store = _open(path)
    store.refresh_if_older(_FRESH_S)  # the cache key may have seen files newer than the views
    fn = _OVERRIDES.get(kind) or getattr(query, kind)
    return fn(store, *args, **dict(kwargs))


def cached(store: Store, kind: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``healthwatch.query.<kind>`` (or the app's faster equivalent) cached on ``store.version``.

    Kept for pages that call named queries directly (Compare); a rerun without new segments
    re-reads nothing.
    """
    return _cached(kind, (store.version,), str(store.root), tuple(args), tuple(sorted(kwargs.items())))


def cached_run(store: Store, run: str, fn: Callable[..., Any], *args: Any,
               tables: Sequence[str] = ("scalars", "layer_stats", "attempts"), **kwargs: Any) -> Any:
    """``fn(store, run, *args, **kwargs)`` cached on ``run``'s own signature (see :func:`run_signature`)."""
    return _cached_fn(fn.__name__, run_signature(store, run, tables), str(store.root), run, tuple(args),
                      tuple(sorted(kwargs.items())))


@st.cache_data(max_entries=1024, show_spinner=False)
def _cached_fn(name: str, sig: tuple, path: str, run: str, args: tuple, kwargs: tuple) -> Any:
    store = _open(path)
    store.refresh_if_older(_FRESH_S)  # the signature may have seen files newer than the views
    return _FUNCS[name](store, run, *args, **dict(kwargs))


#: How old the store's listing may be when a cache miss queries it (one listing costs ~5 ms
#: per 100 directories; a page makes ~50 queries).
_FRESH_S = 0.5


_FUNCS: dict[str, Callable[..., Any]] = {}


def _register(fn: Callable[..., Any]) -> Callable[..., Any]:
    _FUNCS[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------------------------
# attempts and paths


@dataclass(frozen=True)
class Timeline:
    """The rows of a run as seen by one attempt: its own rows from its ``start_step`` on, and the
    rows of earlier attempts before the point where a later attempt (≤ this one) took over.

    The effective path is the path of the latest attempt (what ``*_effective`` shows); the path
    of a rolled-back attempt is its diverged timeline, which the Divergence page analyses.
    ``cut`` maps each earlier attempt to the step from which its rows are superseded.
    """

    attempt: int | None
    cut: tuple[tuple[int, int], ...] = ()

    def predicate(self, params: list[Any]) -> str:
        """SQL (``AND …``) keeping the rows of this path; appends its parameters to ``params``."""
        sql = ""
        if self.attempt is not None:
            sql += " AND attempt <= ?"
            params.append(int(self.attempt))
        for attempt, step in self.cut:
            sql += " AND NOT (attempt = ? AND step >= ?)"
            params += [int(attempt), int(step)]
        return sql

    def superseded_expr(self, params: list[Any]) -> str:
        """SQL boolean expression: true for rows of the run that are *not* on this path."""
        parts = ["(attempt = ? AND step >= ?)" for _ in self.cut]
        for attempt, step in self.cut:
            params += [int(attempt), int(step)]
        if self.attempt is not None:
            parts.append("attempt > ?")
            params.append(int(self.attempt))
        return "(" + " OR ".join(parts) + ")" if parts else "false"


@_register
def attempts(store: Store, run: str) -> pl.DataFrame:
    """Attempts of ``run`` as ``(attempt, start_step, started_at, reason, superseded_from)``."""
    df = store.sql(
        "SELECT attempt, min(start_step) AS start_step, min(started_at) AS started_at, any_value(reason) AS reason "
        "FROM attempts WHERE run = ? GROUP BY attempt ORDER BY attempt", [run]
    ).pl()
    later = [min((s for a2, s in zip(df["attempt"], df["start_step"]) if a2 > a), default=None)
             for a in df["attempt"]]
    return df.with_columns(pl.Series("superseded_from", later, dtype=pl.Int64))


def path_for(att: pl.DataFrame, attempt: int | None = None) -> Timeline:
    """The :class:`Timeline` of ``attempt`` (``None``: the effective path of the latest attempt)."""
    if att.height == 0:
        return Timeline(None)
    rows = list(zip(att["attempt"].to_list(), att["start_step"].to_list()))
    upto = max(a for a, _ in rows) if attempt is None else attempt
    cut = []
    for a, _s in rows:
        if a >= upto:
            continue
        later = [s for a2, s in rows if a < a2 <= upto and s is not None]
        if later:
            cut.append((a, min(later)))
    return Timeline(None if attempt is None else attempt, tuple(cut))


# --------------------------------------------------------------------------------------------
# small per-run facts


@_register
def scalar_names(store: Store, run: str) -> list[str]:
    """Scalar names logged for ``run``, sorted (rollup names plus the raw rows after the rollup)."""
    cover = _rollup_cover(store, "scalars_rollup", run)
    if cover is None:
        rows = store.sql("SELECT DISTINCT name FROM scalars WHERE run = ?", [run]).fetchall()
    else:
        rows = store.sql(
            "SELECT DISTINCT name FROM scalars_rollup WHERE run = ? AND bucket_size = ? UNION "
            "SELECT DISTINCT name FROM scalars WHERE run = ? AND step > ?",
            [run, ROLLUP_BUCKETS[-1], run, cover],
        ).fetchall()
    return sorted(r[0] for r in rows)


@_register
def layer_info(store: Store, run: str) -> pl.DataFrame:
    """Distinct ``(metric, layer, layer_type)`` of ``run``; read from the rollups where they exist,
    because a DISTINCT over 10^8 raw rows costs seconds."""
    cover = _rollup_cover(store, "layer_stats_rollup", run)
    if cover is None:
        q, params = "SELECT DISTINCT metric, layer, layer_type FROM layer_stats WHERE run = ?", [run]
    else:
        q = ("SELECT DISTINCT metric, layer, layer_type FROM layer_stats_rollup WHERE run = ? AND bucket_size = ? "
             "UNION SELECT DISTINCT metric, layer, layer_type FROM layer_stats WHERE run = ? AND step > ?")
        params = [run, ROLLUP_BUCKETS[-1], run, cover]
    return store.sql(f"SELECT * FROM ({q}) ORDER BY metric, layer", params).pl()


def _rollup_cover(store: Store, table: str, run: str) -> int | None:
    """Last step covered by ``run``'s rollups, or None when there are none."""
    row = store.sql(f"SELECT max(step_max) FROM {table} WHERE run = ?", [run]).fetchone()
    return None if row is None or row[0] is None else int(row[0])


@_register
def rollup_valid_until(store: Store, run: str, table: str = "layer_stats") -> int | None:
    """First step from which ``run``'s 100-step rollups of ``table`` can no longer be used, or None
    (:func:`healthwatch.query.rollup_valid_until`, cached here on the run's signature)."""
    return query.rollup_valid_until(store, run, table)


@_register
def run_overview(store: Store, run: str) -> dict[str, Any]:
    """One run's facts for a page header: lineage, precision, attempts, first/last step and tokens."""
    meta = store.sql("SELECT parent, branch_step, branch_tokens, precision, created FROM runs WHERE run = ?",
                     [run]).fetchone()
    last = store.sql(
        "SELECT min(step), max(step), max(tokens), max(wall_time), min(step) < max(step) FROM scalars WHERE run = ?",
        [run]).fetchone()
    att = attempts(store, run)
    return {
        "run": run,
        "parent": meta[0] if meta else None,
        "branch_step": meta[1] if meta else None,
        "branch_tokens": meta[2] if meta else None,
        "precision": meta[3] if meta else None,
        "attempts": att.height,
        "rollbacks": int(att.filter(pl.col("superseded_from").is_not_null()).height),
        "first_step": None if last is None else last[0],
        "last_step": None if last is None else last[1],
        "last_tokens": None if last is None else last[2],
        "last_write": None if last is None else last[3],
        "several_steps": bool(last and last[4]),
    }


def is_live(last_write: float | None, now: float | None = None) -> bool:
    """Whether a run with this last write time counts as live."""
    return last_write is not None and (now or time.time()) - last_write < LIVE_S


# --------------------------------------------------------------------------------------------
# incremental min/max downsampled series


@dataclass(frozen=True)
class Signal:
    """One line of a chart: a scalar (``metric`` is its name) or an aggregate over layers."""

    metric: str
    agg: Agg | None = None  # None: a scalar; else the aggregate over layers per step
    layers: tuple[int, int] | None = None  # inclusive layer range for the aggregate (None: all)

    @property
    def key(self) -> str:
        """Stable name of the signal (the ``sig`` column of frames)."""
        if self.agg is None:
            return self.metric
        rng = "" if self.layers is None else f"[{self.layers[0]}-{self.layers[1]}]"
        return f"{self.metric}{rng}:{self.agg}"


_AGG_SQL = {"max": "max(value)", "median": "median(value)", "mean": "avg(value)", "min": "min(value)",
            "sum": "sum(value)"}
# From 100-step rollups: candidate points per rollup bucket for each aggregate over layers. max
# keeps the exact bucket maximum (spikes) plus a lower envelope; mean and sum are exact bucket
# means; median is the median of the layers' bucket means (the rollups keep no per-step rows).
_ROLLUP_AGG = {"max": ["max(vmax)", "max(vmin)"], "min": ["min(vmin)", "min(vmax)"], "mean": ["avg(vmean)"],
               "sum": ["sum(vmean)"], "median": ["median(vmean)"]}


def _source_sql(run: str, signals: Sequence[Signal], path: Timeline, step_from: int,
                until: dict[str, int | None] | None = None) -> tuple[str, list[Any]]:
    """SQL yielding ``(sig, superseded, step, tokens, value, attempt)`` rows with ``step >= step_from``.

    ``until`` maps ``"scalars"``/``"layer_stats"`` to the step below which the 100-step rollups
    may stand in for the effective rows (see :func:`rollup_valid_until`); rows off the path
    (superseded) are never in rollups, so below that step they are still read raw.
    """
    parts: list[str] = []
    params: list[Any] = []
    until = until or {}
    b = ROLLUP_BUCKETS[0]
    sp: list[Any] = []
    has_ghosts = path.superseded_expr(sp) != "false"

    def ranges(table: str) -> tuple[int | None, int]:
        u = until.get(table)
        return (u, u) if u is not None and u > step_from else (None, step_from)

    scalars = [s.metric for s in signals if s.agg is None]
    if scalars:
        marks = ", ".join("?" for _ in scalars)
        u, raw_from = ranges("scalars")
        if u is not None:
            # Each 100-step bucket's minimum and maximum, placed at the bucket's first step.
            parts.append(
                "SELECT name AS sig, false AS superseded, step_min AS step, tokens_min AS tokens, v AS value, "
                "NULL::INTEGER AS attempt FROM (SELECT name, step_min, tokens_min, unnest([vmin, vmax]) AS v "
                f"FROM scalars_rollup WHERE run = ? AND name IN ({marks}) AND bucket_size = ? "
                "AND bucket * ? >= ? AND bucket * ? < ?)")
            params += [run, *scalars, b, b, int(step_from), b, u]
            if has_ghosts:
                gp: list[Any] = []
                ghost = path.superseded_expr(gp)
                parts.append(f"SELECT name AS sig, true AS superseded, step, tokens, value, attempt FROM scalars "
                             f"WHERE run = ? AND name IN ({marks}) AND step >= ? AND step < ? AND {ghost}")
                params += [run, *scalars, int(step_from), u, *gp]
        sp = []
        sup = path.superseded_expr(sp)
        parts.append(f"SELECT name AS sig, {sup} AS superseded, step, tokens, value, attempt FROM scalars "
                     f"WHERE run = ? AND name IN ({marks}) AND step >= ?")
        params += sp + [run, *scalars, int(raw_from)]
    for s in signals:
        if s.agg is None:
            continue
        rng, rparams = "", []
        if s.layers is not None:
            rng, rparams = " AND layer BETWEEN ? AND ?", [int(s.layers[0]), int(s.layers[1])]
        u, raw_from = ranges("layer_stats")
        per_step = (f"SELECT ? AS sig, superseded, step, any_value(tokens) AS tokens, {_AGG_SQL[s.agg]} AS value, "
                    "any_value(attempt) AS attempt FROM (SELECT {sup} AS superseded, step, tokens, value, attempt "
                    f"FROM layer_stats WHERE run = ? AND metric = ? AND step >= ?{{hi}}{rng}{{extra}}) "
                    "GROUP BY superseded, step")
        if u is not None:
            cands = _ROLLUP_AGG[s.agg]
            values = ", ".join(f"{c} AS v{i}" for i, c in enumerate(cands))
            parts.append(
                f"SELECT ? AS sig, false AS superseded, step, tokens, unnest([{', '.join(f'v{i}' for i in range(len(cands)))}]) "
                f"AS value, NULL::INTEGER AS attempt FROM (SELECT min(step_min) AS step, min(tokens_min) AS tokens, "
                f"{values} FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ? AND bucket * ? >= ? "
                f"AND bucket * ? < ?{rng} GROUP BY bucket)")
            params += [s.key, run, s.metric, b, b, int(step_from), b, u, *rparams]
            if has_ghosts:
                gp = []
                ghost = path.superseded_expr(gp)
                parts.append(per_step.format(sup="true", hi=" AND step < ?", extra=f" AND {ghost}"))
                params += [s.key, run, s.metric, int(step_from), u, *rparams, *gp]
        sp = []
        sup = path.superseded_expr(sp)
        parts.append(per_step.format(sup=sup, hi="", extra=""))
        params += [s.key, *sp, run, s.metric, int(raw_from), *rparams]
    return " UNION ALL ".join(parts), params


_PICK = ("arg_min({'step': step, 'tokens': tokens, 'value': value, 'attempt': attempt}, "
         "(value IS NULL, value, step)) AS pmin, "
         "arg_max({'step': step, 'tokens': tokens, 'value': value, 'attempt': attempt}, "
         "(value IS NOT NULL, value, -step)) AS pmax")


def _points(df: pl.DataFrame) -> pl.DataFrame:
    """Unnest ``pmin``/``pmax`` structs into one row per kept point (a bucket's min and max)."""
    if df.height == 0:
        return pl.DataFrame(schema=_POINT_SCHEMA)
    out = pl.concat([
        df.select("sig", "superseded", "b", pl.col(c).struct.unnest()) for c in ("pmin", "pmax")
    ])
    # A bucket whose minimum and maximum are one row keeps one point. (Rollup candidates of one
    # 100-step bucket share a step, so the value is part of the key.)
    return (out.unique(subset=["sig", "superseded", "step", "value"], keep="first", maintain_order=True)
            .select([pl.col(k).cast(v) for k, v in _POINT_SCHEMA.items()]))


def _coarsen(points: pl.DataFrame, width: int) -> pl.DataFrame:
    """Re-bucket kept points at a coarser ``width`` (a multiple of the old one), keeping each new
    bucket's minimum and maximum row: exact, since min/max of a union are min/max of the parts."""
    if points.height == 0:
        return points
    p = points.with_columns((pl.col("step") // width).alias("b"))
    keys = ["sig", "superseded", "b"]
    lo = p.sort([pl.col("value").is_null(), "value", "step"]).group_by(keys, maintain_order=True).first()
    hi = p.sort([pl.col("value").is_not_null(), "value", -pl.col("step")], descending=[True, True, False],
                nulls_last=True).group_by(keys, maintain_order=True).first()
    return (pl.concat([lo, hi.select(lo.columns)])
            .unique(subset=["sig", "superseded", "step", "value"], maintain_order=True)
            .select(list(_POINT_SCHEMA)))


def _buckets_per_series(points: pl.DataFrame) -> int:
    if points.height == 0:
        return 0
    return int(points.group_by("sig", "superseded").agg(pl.col("b").n_unique())["b"].max())


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    base: tuple | None = None  # attempts signature + signals: any change means a full reload
    sig: tuple | None = None  # run signature at the last read
    width: int = 1
    points: pl.DataFrame | None = None
    hi: int | None = None  # highest step read so far
    loaded_at: float = 0.0
    reads: int = 0  # SQL reads done (tests check that an idle refresh reads nothing)


class SeriesCache:
    """Min/max-downsampled series of one run, updated incrementally as the run grows.

    One instance per server (``st.cache_resource``); entries are keyed by (run, signals, path) and
    guarded by their own lock, so concurrent sessions share one read.
    """

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self.max_points = max_points
        self._states: dict[tuple, _State] = {}
        self._lock = threading.Lock()

    def state(self, key: tuple) -> _State:
        """The (possibly new) state of one cache entry."""
        with self._lock:
            return self._states.setdefault(key, _State())

    def get(self, store: Store, run: str, signals: Sequence[Signal], attempt: int | None = None,
            include_superseded: bool = True) -> pl.DataFrame:
        """Points of ``signals`` as ``(sig, superseded, b, step, tokens, value, attempt)``, sorted.

        ``attempt`` picks the path (None: effective); with ``include_superseded`` the rows off the
        path are included and flagged (drawn ghosted).
        """
        signals = tuple(signals)
        key = (str(store.root), run, signals, attempt, include_superseded)
        state = self.state(key)
        tables = ("scalars", "attempts") if all(s.agg is None for s in signals) else ("scalars", "layer_stats", "attempts")
        with state.lock:
            sig = run_signature(store, run, tables)
            base = (sig[-1],)  # the attempts directory: a new attempt changes which rows are superseded
            if state.points is not None and sig == state.sig:
                return state.points
            full = (state.points is None or base != state.base or time.time() - state.loaded_at > FULL_RELOAD_S)
            att = attempts(store, run)
            path = path_for(att, attempt)
            if full:
                self._load_full(store, run, signals, path, state)
                state.base = base
            else:
                self._load_tail(store, run, signals, path, state)
            state.sig = sig
            return state.points  # type: ignore[return-value]

    def _finish(self, state: _State, points: pl.DataFrame, include_superseded: bool = True) -> None:
        nb = max(1, self.max_points // 2)
        while _buckets_per_series(points) > nb:
            nxt = next((w for w in WIDTHS if w > state.width), state.width * 2)
            if nxt % state.width:
                break  # not nested: the caller reloads in full at the new width
            state.width = nxt
            points = _coarsen(points, nxt)
        state.points = points.sort("sig", "superseded", "step")
        state.hi = int(points["step"].max()) if points.height else state.hi

    def _load_full(self, store: Store, run: str, signals: tuple[Signal, ...], path: Timeline, state: _State) -> None:
        lohi = self._span(store, run, signals)
        if lohi is None:
            state.points, state.hi, state.width = pl.DataFrame(schema=_POINT_SCHEMA), None, 1
            state.loaded_at = time.time()
            return
        lo, hi = lohi
        nb = max(1, self.max_points // 2)
        width = next((w for w in WIDTHS if hi // w - lo // w + 1 <= nb), WIDTHS[-1])
        until: dict[str, int | None] = {}
        if width % ROLLUP_BUCKETS[0] == 0 and path.attempt is None:
            # Whole-run view of a compacted run: rollups stand in for the effective rows.
            for table in ("scalars", "layer_stats"):
                until[table] = cached_run(store, run, rollup_valid_until, table,
                                          tables=(f"{table}_rollup", "attempts"))
        src, params = _source_sql(run, signals, path, -(2**62), until)
        df = store.sql(f"SELECT sig, superseded, step // ? AS b, {_PICK} FROM ({src}) GROUP BY ALL",
                       [width, *params]).pl()
        state.reads += 1
        state.width = width
        state.loaded_at = time.time()
        self._finish(state, _points(df))

    def _load_tail(self, store: Store, run: str, signals: tuple[Signal, ...], path: Timeline, state: _State) -> None:
        assert state.points is not None
        if state.hi is None:
            self._load_full(store, run, signals, path, state)
            return
        w = state.width
        start = (state.hi // w) * w  # re-read the last, possibly partial, bucket
        src, params = _source_sql(run, signals, path, start)
        df = store.sql(f"SELECT sig, superseded, step // ? AS b, {_PICK} FROM ({src}) GROUP BY ALL",
                       [w, *params]).pl()
        state.reads += 1
        old = state.points.filter(pl.col("step") < start)
        points = pl.concat([old, _points(df)])
        before = state.width
        self._finish(state, points)
        if _buckets_per_series(state.points) > max(1, self.max_points // 2) and state.width == before:
            self._load_full(store, run, signals, path, state)  # ladder step not nested (64 -> 100)

    @staticmethod
    def _span(store: Store, run: str, signals: Sequence[Signal]) -> tuple[int, int] | None:
        """First and last step of the signals' rows (from rollups plus the raw tail where possible)."""
        lo = hi = None
        scalars = [s.metric for s in signals if s.agg is None]
        metrics = sorted({s.metric for s in signals if s.agg is not None})
        for table, names, col in (("scalars", scalars, "name"), ("layer_stats", metrics, "metric")):
            if not names:
                continue
            marks = ", ".join("?" for _ in names)
            cover = store.sql(f"SELECT min(step_min), max(step_max) FROM {table}_rollup WHERE run = ? AND "
                              f"{col} IN ({marks}) AND bucket_size = ?", [run, *names, ROLLUP_BUCKETS[-1]]).fetchone()
            if cover and cover[0] is not None:
                tail = store.sql(f"SELECT max(step) FROM {table} WHERE run = ? AND {col} IN ({marks}) AND step > ?",
                                 [run, *names, int(cover[1])]).fetchone()
                # Rows of a rolled-back attempt may lie beyond the rollups' last step: the tail covers them.
                first = store.sql(f"SELECT min(step) FROM {table} WHERE run = ? AND {col} IN ({marks}) AND step < ?",
                                  [run, *names, int(cover[0])]).fetchone()
                row = (min(int(cover[0]), first[0]) if first and first[0] is not None else int(cover[0]),
                       max(int(cover[1]), tail[0]) if tail and tail[0] is not None else int(cover[1]))
            else:
                row = store.sql(f"SELECT min(step), max(step) FROM {table} WHERE run = ? AND {col} IN ({marks})",
                                [run, *names]).fetchone()
            if row and row[0] is not None:
                lo = row[0] if lo is None else min(lo, row[0])
                hi = row[1] if hi is None else max(hi, row[1])
        return None if lo is None else (int(lo), int(hi))


@st.cache_resource(show_spinner=False)
def series_cache() -> SeriesCache:
    """The server-wide :class:`SeriesCache`."""
    return SeriesCache()


def series(store: Store, run: str, signals: Sequence[Signal], attempt: int | None = None) -> pl.DataFrame:
    """Downsampled points of ``signals`` of ``run`` (with superseded rows flagged), read incrementally."""
    return series_cache().get(store, run, signals, attempt)


def layer_aggregate(store: Store, run: str, metric: str, agg: Agg = "max", max_points: int = MAX_POINTS) -> pl.DataFrame:
    """Per-step aggregate over layers as ``(step, tokens, value)``, min/max-downsampled in SQL
    (a drop-in for :func:`healthwatch.query.layer_aggregate`, which downsamples in polars)."""
    pts = SeriesCache(max_points).get(store, run, [Signal(metric, agg)], include_superseded=False)
    return pts.filter(~pl.col("superseded")).select("step", "tokens", "value")


_OVERRIDES: dict[str, Callable[..., Any]] = {"layer_aggregate": layer_aggregate}


# --------------------------------------------------------------------------------------------
# heatmaps, profiles, expert load


_HEAT_SCHEMA = {"layer": pl.Int32, "layer_type": pl.Utf8, "step": pl.Int64, "value": pl.Float64}


@_register
def heatmap(store: Store, run: str, metric: str, max_buckets: int = 240, agg: str = "mean") -> pl.DataFrame:
    """Layer x step-bucket grid ``(layer, layer_type, step, value)`` of the effective rows, bucketed
    in SQL; ``step`` is each bucket's first step.

    Like :func:`healthwatch.query.heatmap`, complete 100-step rollup buckets stand in for raw rows
    (≈1 % of them), but only while they are current (:func:`rollup_valid_until`: not after a
    rollback newer than the compaction), and raw rows are read only after the last complete bucket
    (the raw tail of a compacted 10^8-row run touches one row group per layer, ~0.3 s).
    """
    att = attempts(store, run)
    path = path_for(att)
    until = rollup_valid_until(store, run)
    r = ROLLUP_BUCKETS[0]
    lo = hi = None
    if until is not None:
        row = store.sql("SELECT min(step_min), max(step_max) FROM layer_stats_rollup WHERE run = ? AND metric = ? "
                        "AND bucket_size = ?", [run, metric, ROLLUP_BUCKETS[-1]]).fetchone()
        if row and row[0] is not None:
            lo, hi = int(row[0]), min(int(row[1]), until - 1)
    params: list[Any] = [run, metric, -(2**62) if until is None else until]
    pred = path.predicate(params)
    tail = store.sql(f"SELECT min(step), max(step) FROM layer_stats WHERE run = ? AND metric = ? AND step >= ?{pred}",
                     params).fetchone()
    if tail and tail[0] is not None:
        lo = int(tail[0]) if lo is None else min(lo, int(tail[0]))
        hi = int(tail[1]) if hi is None else max(hi, int(tail[1]))
    if lo is None or hi is None:
        return pl.DataFrame(schema=_HEAT_SCHEMA)
    width = max(1, math.ceil((hi - lo + 1) / max_buckets))
    use_rollup = until is not None and width >= r
    if use_rollup:
        width = -(-width // r) * r  # rollup buckets nest inside display buckets
    raw_agg = {"mean": "avg(value)", "max": "max(value)", "min": "min(value)", "last": "arg_max(value, step)"}[agg]
    parts: list[str] = []
    qp: list[Any] = []
    raw_from = -(2**62)
    if use_rollup:
        r_agg = {"mean": "sum(vmean * n) / sum(n)", "max": "max(vmax)", "min": "min(vmin)",
                 "last": "arg_max(vlast, step_max)"}[agg]
        parts.append(f"SELECT layer, any_value(layer_type) AS layer_type, (bucket * {r}) // ? AS b, {r_agg} AS value, "
                     "sum(n) AS n FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ? "
                     "AND bucket * ? < ? GROUP BY layer, b")
        qp += [width, run, metric, r, r, until]
        raw_from = until  # type: ignore[assignment]
    rp: list[Any] = [run, metric, raw_from]
    rpred = path.predicate(rp)
    parts.append(f"SELECT layer, any_value(layer_type) AS layer_type, step // ? AS b, {raw_agg} AS value, "
                 f"count(*) AS n FROM layer_stats WHERE run = ? AND metric = ? AND step >= ?{rpred} GROUP BY layer, b")
    qp += [width, *rp]
    # A display bucket split between rollup and raw rows is merged again, weighted by row counts.
    final = {"mean": "sum(value * n) / sum(n)", "max": "max(value)", "min": "min(value)", "last": "last(value)"}[agg]
    return store.sql(
        f"SELECT layer::INTEGER AS layer, any_value(layer_type) AS layer_type, (b * ?)::BIGINT AS step, {final} AS value "
        f"FROM ({' UNION ALL '.join(parts)}) GROUP BY layer, b ORDER BY layer, step", [width, *qp]).pl()


@_register
def layer_profiles(store: Store, run: str, metric: str, steps: tuple[int, ...]) -> pl.DataFrame:
    """Per-layer values of ``metric`` at the logged step nearest at or before each of ``steps``
    (effective rows), as ``(asked, step, tokens, layer, layer_type, value)``.

    A step that ends a 100-step rollup bucket is read from the rollup's ``vlast`` (the exact value
    at that step, a few thousand rows to scan instead of a hundred row groups of raw rows).
    """
    att = attempts(store, run)
    path = path_for(att)
    info = layer_info(store, run).filter(pl.col("metric") == metric)
    if info.height == 0:
        return pl.DataFrame(schema=_PROFILE_SCHEMA)
    n_layers, first_layer = info.height, int(info["layer"].min())
    until = rollup_valid_until(store, run)
    size = ROLLUP_BUCKETS[0]
    ends = [int(a) for a in steps if until is not None and int(a) < until and int(a) % size == size - 1]
    from_rollup: dict[int, pl.DataFrame] = {}
    if ends:  # every bucket-end step in one query (placeholders, one per step)
        marks = ", ".join("?" for _ in ends)
        both = store.sql(
            "SELECT step_max::BIGINT AS asked, step_max AS step, tokens_max AS tokens, layer, layer_type, "
            f"vlast AS value FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ? "
            f"AND bucket IN ({marks}) AND step_max IN ({marks}) ORDER BY step_max, layer",
            [run, metric, size, *[e // size for e in ends], *ends]).pl()
        for (asked,), part in both.partition_by("asked", as_dict=True).items():
            from_rollup[int(asked)] = part
    frames = []
    for asked in steps:
        asked = int(asked)
        df = from_rollup.get(asked)
        if df is not None and df.height == n_layers:
            frames.append(df)
            continue
        # The nearest logged step from one layer's rows (compacted files are sorted by metric,
        # layer, step, so this prunes to a few row groups), then one exact-step read.
        params: list[Any] = [run, metric, first_layer, asked]
        pred = path.predicate(params)
        at = store.sql(f"SELECT max(step) FROM layer_stats WHERE run = ? AND metric = ? AND layer = ? AND step <= ?"
                       f"{pred}", params).fetchone()
        if at is None or at[0] is None:
            continue
        p2: list[Any] = [run, metric, int(at[0])]
        pred2 = path.predicate(p2)
        frames.append(store.sql(
            f"SELECT ?::BIGINT AS asked, step, tokens, layer, layer_type, value FROM layer_stats "
            f"WHERE run = ? AND metric = ? AND step = ?{pred2} ORDER BY layer", [asked, *p2]).pl())
    return pl.concat([f.cast(_PROFILE_SCHEMA) for f in frames]) if frames else pl.DataFrame(schema=_PROFILE_SCHEMA)


_PROFILE_SCHEMA = {"asked": pl.Int64, "step": pl.Int64, "tokens": pl.Int64, "layer": pl.Int32, "layer_type": pl.Utf8,
                   "value": pl.Float64}


def profile_steps(lo: int, hi: int, rollup_until: int | None, n: int = 9) -> list[int]:
    """``n`` evenly spaced steps over ``[lo, hi]`` for profile pickers; on a compacted run they are
    snapped to the last step of a 100-step rollup bucket (read exactly from the rollup)."""
    out = set()
    for i in range(n):
        s = lo + (hi - lo) * i // max(1, n - 1)
        if rollup_until is not None and s < rollup_until:
            s = min(s // ROLLUP_BUCKETS[0] * ROLLUP_BUCKETS[0] + ROLLUP_BUCKETS[0] - 1, rollup_until - 1)
        out.add(int(s))
    return sorted(out)


@_register
def expert_load_steps(store: Store, run: str) -> list[int]:
    """Steps at which expert-load vectors were sampled (effective rows), ascending."""
    return [r[0] for r in store.sql("SELECT DISTINCT step FROM expert_load_effective WHERE run = ? ORDER BY step",
                                    [run]).fetchall()]


@_register
def expert_load_at(store: Store, run: str, step: int) -> pl.DataFrame:
    """Expert-load vectors ``(layer, step, tokens, counts)`` at the sample at or before ``step``."""
    return query.expert_load_at(store, run, step)


# --------------------------------------------------------------------------------------------
# events, alerts, runs


@_register
def markers(store: Store, run: str) -> pl.DataFrame:
    """What to draw as vertical lines on a run's charts: events and alert transitions, as
    ``(kind, step, tokens, label, superseded)``."""
    ev = store.sql(
        "SELECT kind, step, tokens, coalesce(message, '') AS label, superseded FROM events_all WHERE run = ? ORDER BY step",
        [run]).pl()
    al = store.sql(
        "SELECT 'alert ' || state AS kind, step, tokens, alert || ' (' || severity || ')' || "
        "CASE WHEN layer IS NULL THEN '' ELSE ', layer ' || layer END AS label, false AS superseded "
        "FROM alerts WHERE run = ? AND state IN ('firing', 'resolved') ORDER BY step", [run]).pl()
    return pl.concat([ev, al.cast(ev.schema)]) if al.height else ev


def alert_transitions(store: Store, run: str | None = None) -> pl.DataFrame:
    """Every alert state transition (event-sourced rows), oldest first."""
    where, params = ("WHERE run = ?", [run]) if run else ("", [])
    return _cached("_sql", (store.version,), str(store.root), (
        "SELECT run, alert, \"group\", state, severity, step, tokens, layer, value, labels, annotations, fingerprint, "
        f"wall_time FROM alerts {where} ORDER BY wall_time, step", tuple(params)), ())


def alert_states(store: Store) -> pl.DataFrame:
    """The latest state of every alert instance (run x fingerprint)."""
    df = alert_transitions(store)
    if df.height == 0:
        return df
    return df.sort("wall_time", "step").group_by("run", "fingerprint", maintain_order=True).last()


def _sql(store: Store, q: str, params: tuple) -> pl.DataFrame:
    return store.sql(q, list(params)).pl()


_OVERRIDES["_sql"] = _sql


def runs_table(store: Store) -> pl.DataFrame:
    """All runs with lineage, health (firing/pending alert counts) and live/idle status."""
    df = cached(store, "runs_overview")
    if df.height == 0:
        return df
    states = alert_states(store)
    counts = (states.group_by("run").agg(
        (pl.col("state") == "firing").sum().alias("firing"),
        (pl.col("state") == "pending").sum().alias("pending"),
        pl.col("alert").filter(pl.col("state") == "firing").unique().sort().str.join(", ").alias("firing_alerts"),
    ) if states.height else pl.DataFrame(schema={"run": pl.Utf8, "firing": pl.UInt32, "pending": pl.UInt32,
                                                 "firing_alerts": pl.Utf8}))
    now = time.time()
    return (df.join(counts, on="run", how="left")
            .with_columns(pl.col("firing").fill_null(0), pl.col("pending").fill_null(0),
                          pl.col("last_write").map_elements(lambda t: is_live(t, now), return_dtype=pl.Boolean)
                          .fill_null(False).alias("live")))


def tree_order(df: pl.DataFrame) -> list[tuple[str, int]]:
    """Runs in depth-first lineage order as ``(run, depth)``: roots by creation time, each
    branch under its parent by branch point. A branch whose parent is missing is a root."""
    names = set(df["run"].to_list())
    children: dict[str | None, list[dict]] = {}
    for row in df.sort("created").iter_rows(named=True):
        parent = row["parent"] if row["parent"] in names and row["parent"] != row["run"] else None
        children.setdefault(parent, []).append(row)
    out: list[tuple[str, int]] = []
    seen: set[str] = set()

    def walk(parent: str | None, depth: int) -> None:
        kids = children.get(parent, [])  # roots: by creation time; branches: by branch point
        if parent is not None:
            kids = sorted(kids, key=lambda r: (r["branch_tokens"] is None, r["branch_tokens"] or 0, r["created"] or 0))
        for row in kids:
            if row["run"] in seen:  # a cycle in recorded lineage must not hang the page
                continue
            seen.add(row["run"])
            out.append((row["run"], depth))
            walk(row["run"], depth + 1)

    walk(None, 0)
    out += [(r, 0) for r in df["run"].to_list() if r not in seen]
    return out


def _run_list(store: Store) -> list[str]:
    return [r[0] for r in store.sql("SELECT run FROM runs GROUP BY run ORDER BY min(created), run").fetchall()]


_OVERRIDES["_run_list"] = _run_list


def run_names(store: Store) -> list[str]:
    """Runs of the store, oldest first.

    Reads only the ``runs`` table: the pages that just need the names must not scan every
    scalar of every run (``runs_overview`` took 0.45 s on a 1M-step store, on every cold load).
    """
    return cached(store, "_run_list")


# --------------------------------------------------------------------------------------------
# divergence: signals normalised against a trailing window


@dataclass(frozen=True)
class Crossing:
    """Where one signal first left its trailing band."""

    signal: str
    step: int
    tokens: int | None
    z: float
    direction: str  # "up" | "down"


@_register
def bucket_means(store: Store, run: str, signals: Sequence[Signal], attempt: int | None,
                 lo: int, hi: int, buckets: int) -> pl.DataFrame:
    """Per-bucket means of ``signals`` on the path of ``attempt`` within ``[lo, hi]``, as
    ``(sig, step, tokens, value)`` with ``step`` the first step of the bucket (fixed width, so
    every signal shares the same time grid). Non-finite values propagate (a NaN bucket stays NaN)."""
    width = max(1, math.ceil((hi - lo + 1) / max(1, buckets)))
    att = attempts(store, run)
    path = path_for(att, attempt)
    parts, params = [], []
    scalars = [s.metric for s in signals if s.agg is None]
    if scalars:
        p: list[Any] = [run, *scalars, int(lo), int(hi)]
        pred = path.predicate(p)
        marks = ", ".join("?" for _ in scalars)
        parts.append(f"SELECT name AS sig, (step - ?) // ? AS b, min(step) AS step, min(tokens) AS tokens, "
                     f"avg(value) AS value FROM scalars WHERE run = ? AND name IN ({marks}) AND step BETWEEN ? AND ?"
                     f"{pred} GROUP BY name, b")
        params += [int(lo), width, *p]
    for s in signals:
        if s.agg is None:
            continue
        rng, rp = "", []
        if s.layers is not None:
            rng, rp = " AND layer BETWEEN ? AND ?", [int(s.layers[0]), int(s.layers[1])]
        p = [run, s.metric, int(lo), int(hi)]
        pred = path.predicate(p)
        parts.append(
            f"SELECT ? AS sig, (step - ?) // ? AS b, min(step) AS step, min(tokens) AS tokens, avg(value) AS value "
            f"FROM (SELECT step, any_value(tokens) AS tokens, {_AGG_SQL[s.agg]} AS value FROM layer_stats "
            f"WHERE run = ? AND metric = ? AND step BETWEEN ? AND ?{pred}{rng} GROUP BY step) GROUP BY b")
        params += [s.key, int(lo), width, *p, *rp]
    if not parts:
        return pl.DataFrame(schema={"sig": pl.Utf8, "step": pl.Int64, "tokens": pl.Int64, "value": pl.Float64})
    return store.sql(f"SELECT sig, step, tokens, value FROM ({' UNION ALL '.join(parts)}) ORDER BY sig, step",
                     params).pl()


def trailing_z(values: np.ndarray, window: int) -> np.ndarray:
    """Robust z-score of each value against the ``window`` values before it:
    ``(x - median) / (1.4826 * MAD)``; NaN for the first ``window`` values. A non-finite value
    scores +inf (it is the strongest possible departure, never dropped)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    z = np.full(n, np.nan)
    if n <= window or window < 2:
        return z
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(x, window)[:-1]  # win[i] = x[i : i + window], the window before x[i + window]
    med = np.nanmedian(np.where(np.isfinite(win), win, np.nan), axis=1)
    mad = np.nanmedian(np.abs(np.where(np.isfinite(win), win, np.nan) - med[:, None]), axis=1)
    # A flat window (e.g. a constant learning rate) has MAD 0: floor the scale at a tiny fraction
    # of the level so that a flat signal stays at z = 0 and any real change stands out.
    scale = np.maximum(1.4826 * mad, 1e-9 * np.maximum(np.abs(med), 1e-12))
    cur = x[window:]
    zz = (cur - med) / scale
    zz[~np.isfinite(cur)] = np.inf
    z[window:] = zz
    return z


def first_crossing(steps: np.ndarray, tokens: np.ndarray, z: np.ndarray, k: float, persist: int,
                   name: str) -> Crossing | None:
    """First bucket where ``|z| >= k`` holds for ``persist`` consecutive buckets (or to the end)."""
    hit = np.abs(np.nan_to_num(z, nan=0.0, posinf=np.inf)) >= k
    n = hit.size
    for i in np.flatnonzero(hit):
        end = min(n, i + max(1, persist))
        if hit[i:end].all():
            zi = float(z[i])
            tok = tokens[i]
            return Crossing(name, int(steps[i]), None if tok is None or (isinstance(tok, float) and np.isnan(tok))
                            else int(tok), zi, "up" if zi > 0 else "down")
    return None


def last_checkpoint_before(store: Store, run: str, attempt: int | None, step: int) -> dict[str, Any] | None:
    """The last checkpoint event on the path of ``attempt`` strictly before ``step``, or None."""
    att = attempts(store, run)
    params: list[Any] = [run, int(step)]
    pred = path_for(att, attempt).predicate(params)
    row = store.sql(f"SELECT step, tokens, attempt, message FROM events WHERE run = ? AND kind = 'checkpoint' "
                    f"AND step < ?{pred} ORDER BY step DESC LIMIT 1", params).fetchone()
    if row is None:
        return None
    return {"step": int(row[0]), "tokens": row[1], "attempt": row[2], "message": row[3]}


def path_span(store: Store, run: str, attempt: int | None) -> tuple[int, int] | None:
    """First and last scalar step on the path of ``attempt``."""
    att = attempts(store, run)
    params: list[Any] = [run]
    pred = path_for(att, attempt).predicate(params)
    row = store.sql(f"SELECT min(step), max(step) FROM scalars WHERE run = ?{pred}", params).fetchone()
    return None if row is None or row[0] is None else (int(row[0]), int(row[1]))
