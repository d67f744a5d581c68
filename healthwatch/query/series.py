"""Line series: min/max-downsampled reads of scalars and per-step aggregates over layers.

Every downsampling keeps each bucket's minimum *and* maximum row (NaN counts as the maximum), so a
one-step spike in a million steps survives into a 2,000-point chart. Whole-run reads use the
coarsest rollups that still give about every drawn bucket its own minimum and maximum (1,000-step
rollups for a million steps at 2,000 points, else 100-step ones: :func:`_coarse_enough`) where
:mod:`healthwatch.query.rollups` says they are valid, raw rows elsewhere.

:class:`SeriesCache` is the incremental reader behind the app's charts: buckets aligned on a
fixed ladder of widths, so a refresh re-reads only the last (partial) bucket and a growing run
coarsens its cached buckets exactly in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from healthwatch.query.rollups import RollupPlan, plan
from healthwatch.query.runs import run_signature, scanned_path, scanned_timeline, timeline
from healthwatch.query.timeline import Timeline
from healthwatch.store import ROLLUP_BUCKETS, Store
from healthwatch.store.reader import per_run, run_scope

#: Points per drawn trace at most (a min and a max per bucket).
MAX_POINTS = 2000
#: Bucket widths. Within a decade each is a multiple of the one before, so cached buckets coarsen
#: exactly in memory; a step into the next decade (64 -> 100, 800 -> 1,000, ...) is not nested and
#: reloads in full. From 100 on every width is a multiple of a rollup size, and each decade starts
#: at one (1,000, 10,000): a million-step run draws 1,000-step buckets straight from the 1,000-step
#: rollups (~1,000 rollup rows per layer) instead of 1,600-step ones from the 100-step rollups
#: (~10,000 per layer: ~0.6 CPU-s cold for the MaxVio-over-layers chart at 108 layers).
WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64) + tuple(
    d * m for d in (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000) for m in (1, 2, 4, 8)
) + tuple(1_000_000_000 * 2**k for k in range(8))
#: Seconds after which an incremental series is re-read in full anyway (a late row for an old
#: step is then picked up).
FULL_RELOAD_S = 600.0

Agg = Literal["max", "median", "mean", "min", "sum"]

_POINT_SCHEMA = {"sig": pl.Utf8, "superseded": pl.Boolean, "b": pl.Int64, "step": pl.Int64, "tokens": pl.Int64,
                 "value": pl.Float64, "attempt": pl.Int32}


#: A rollup row's minimum and maximum as ``{s: step, t: tokens, v: value}`` rows (unnested).
_EXTREMES = ("unnest([{'s': step_vmin, 't': tokens_vmin, 'v': vmin}, "
             "{'s': step_vmax, 't': tokens_vmax, 'v': vmax}])")


def _plans(store: Store, run: str, signals: Sequence[Signal], path: Timeline,
           size: int = ROLLUP_BUCKETS[0]) -> dict[str, RollupPlan]:
    """``size``-step rollup plans of the tables ``signals`` read, narrowed to their keys."""
    out: dict[str, RollupPlan] = {}
    scalars = sorted({s.metric for s in signals if s.agg is None})
    metrics = sorted({s.metric for s in signals if s.agg is not None})
    if scalars:
        out["scalars"] = plan(store, run, "scalars", path, size,
                              f" AND name IN ({', '.join('?' for _ in scalars)})", scalars)
    if metrics:
        key, kp = f" AND metric IN ({', '.join('?' for _ in metrics)})", list(metrics)
        ranges = {s.layers for s in signals if s.agg is not None}
        if len(ranges) == 1 and None not in ranges:
            # One layer range read (a single layer's series): only its keys' coverage matters, and its
            # rollup rows are a hundredth of the metric's.
            (lo, hi), = ranges
            key, kp = key + " AND layer BETWEEN ? AND ?", kp + [int(lo), int(hi)]
        out["layer_stats"] = plan(store, run, "layer_stats", path, size, key, kp)
    return out


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
# From rollups: candidate points per rollup bucket for each aggregate over layers, as
# {s: step, t: tokens, v: value}. max keeps the exact bucket maximum at the step where it was logged
# (a spike stays at its own step, also in a 1,000-step bucket) plus a lower envelope at the bucket's
# first step; min likewise; mean and sum are exact bucket means; median is the median of the layers'
# bucket means (the rollups keep no per-step rows).
_FIRST = "min(step_min), 't': min(tokens_min)"
_ROLLUP_AGG = {
    "max": ["arg_max({'s': step_vmax, 't': tokens_vmax, 'v': vmax}, (vmax, -step_vmax))",
            f"{{'s': {_FIRST}, 'v': max(vmin)}}"],
    "min": ["arg_min({'s': step_vmin, 't': tokens_vmin, 'v': vmin}, (vmin, step_vmin))",
            f"{{'s': {_FIRST}, 'v': min(vmax)}}"],
    "mean": [f"{{'s': {_FIRST}, 'v': avg(vmean)}}"],
    "sum": [f"{{'s': {_FIRST}, 'v': sum(vmean)}}"],
    "median": [f"{{'s': {_FIRST}, 'v': median(vmean)}}"],
}


def _source_sql(run: str, signals: Sequence[Signal], path: Timeline, step_from: int,
                plans: dict[str, RollupPlan] | None = None,
                no_raw: frozenset[str] = frozenset()) -> tuple[str, list[Any]]:
    """SQL yielding ``(sig, superseded, step, tokens, value, attempt)`` rows with ``step >= step_from``.

    ``plans`` maps ``"scalars"``/``"layer_stats"`` to the :class:`RollupPlan` of the path: usable
    rollup rows stand in for the raw rows they summarise (each bucket's minimum and maximum, placed
    at their own steps or the bucket's first step); superseded rows are never in a plan, so ghosts
    are always read raw. ``no_raw`` names tables known to hold no raw row that their plan leaves to
    the raw read (:func:`_raw_beyond_plans`): their raw part is left out.
    """
    parts: list[str] = []
    params: list[Any] = []
    plans = plans or {}
    sp: list[Any] = []
    scalars = [s.metric for s in signals if s.agg is None]
    if scalars:
        marks = ", ".join("?" for _ in scalars)
        pl_ = plans.get("scalars")
        rawx = ""
        rawp: list[Any] = []
        if pl_ is not None and pl_.used:
            rp: list[Any] = []
            pred = pl_.rollup_pred(rp, lo=step_from if step_from > -(2**61) else None)
            # Each bucket's minimum and maximum at their own step and tokens.
            parts.append(
                "SELECT name AS sig, false AS superseded, p.s AS step, p.t AS tokens, p.v AS value, "
                f"NULL::INTEGER AS attempt FROM (SELECT name, {_EXTREMES} AS p "
                f"FROM scalars_rollup WHERE run = ? AND name IN ({marks}) AND bucket_size = ? AND {pred})")
            params += [run, *scalars, pl_.size, *rp]
            rawx = pl_.raw_pred(rawp)
        # Raw rows: off-path rows (ghosts) always; on-path rows unless a rollup serves them.
        conds, cps = (pl_.raw_conditions(), pl_.raw_params()) if rawx and pl_ is not None else ([""], [[]])
        if rawx and "scalars" in no_raw:
            conds, cps = [], []
        for cond, cp in zip(conds, cps):
            sp = []
            sup = path.superseded_expr(sp)
            parts.append(f"SELECT name AS sig, {sup} AS superseded, step, tokens, value, attempt FROM scalars "
                         f"WHERE run = ? AND name IN ({marks}) AND step >= ?{cond}")
            params += sp + [run, *scalars, int(step_from), *cp]
    for s in signals:
        if s.agg is None:
            continue
        rng, rparams = "", []
        if s.layers is not None:
            rng, rparams = " AND layer BETWEEN ? AND ?", [int(s.layers[0]), int(s.layers[1])]
        pl_ = plans.get("layer_stats")
        rawx, rawp = "", []
        one_layer = s.layers is not None and s.layers[0] == s.layers[1]
        if pl_ is not None and pl_.used and one_layer:
            rp = []
            pred = pl_.rollup_pred(rp, lo=step_from if step_from > -(2**61) else None)
            parts.append(
                "SELECT ? AS sig, false AS superseded, p.s AS step, p.t AS tokens, p.v AS value, NULL::INTEGER AS attempt "
                f"FROM (SELECT {_EXTREMES} AS p FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ? "
                f"AND {pred}{rng})")
            params += [s.key, run, s.metric, pl_.size, *rp, *rparams]
            rawx = pl_.raw_pred(rawp)
        elif pl_ is not None and pl_.used:
            cands = _ROLLUP_AGG[s.agg]
            values = ", ".join(f"{c} AS v{i}" for i, c in enumerate(cands))
            rp = []
            pred = pl_.rollup_pred(rp, lo=step_from if step_from > -(2**61) else None)
            parts.append(
                "SELECT ? AS sig, false AS superseded, p.s AS step, p.t AS tokens, p.v AS value, NULL::INTEGER AS attempt "
                f"FROM (SELECT unnest([{', '.join(f'v{i}' for i in range(len(cands)))}]) AS p FROM (SELECT "
                f"{values} FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ? AND {pred}"
                f"{rng} GROUP BY bucket))")
            params += [s.key, run, s.metric, pl_.size, *rp, *rparams]
            rawx = pl_.raw_pred(rawp)
        inner, ip = [], []
        conds, cps = (pl_.raw_conditions(), pl_.raw_params()) if rawx and pl_ is not None else ([""], [[]])
        if rawx and "layer_stats" in no_raw:
            continue
        for cond, cp in zip(conds, cps):
            sp = []
            sup = path.superseded_expr(sp)
            inner.append(f"SELECT {sup} AS superseded, step, tokens, value, attempt FROM layer_stats "
                         f"WHERE run = ? AND metric = ? AND step >= ?{rng}{cond}")
            ip += [*sp, run, s.metric, int(step_from), *rparams, *cp]
        parts.append(
            f"SELECT ? AS sig, superseded, step, any_value(tokens) AS tokens, {_AGG_SQL[s.agg]} AS value, "
            f"any_value(attempt) AS attempt FROM ({' UNION ALL '.join(inner)}) GROUP BY superseded, step")
        params += [s.key, *ip]
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
        with run_scope(run):
            return self._get(store, run, tuple(signals), attempt, include_superseded)

    def _get(self, store: Store, run: str, signals: tuple[Signal, ...], attempt: int | None,
             include_superseded: bool) -> pl.DataFrame:
        key = (str(store.root), run, signals, attempt, include_superseded)
        state = self.state(key)
        tables = ("scalars", "attempts") if all(s.agg is None for s in signals) else ("scalars", "layer_stats", "attempts")
        with state.lock:
            sig = run_signature(store, run, tables)
            base = (sig[-1],)  # the attempts directory: a new attempt changes which rows are superseded
            if state.points is not None and sig == state.sig:
                return state.points
            full = (state.points is None or base != state.base or time.time() - state.loaded_at > FULL_RELOAD_S)
            path = timeline(store, run, attempt)
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
        memo: dict[str, Any] = {}  # footer step ranges, read once per load
        lohi = self._span(store, run, signals, memo)
        if lohi is None:
            state.points, state.hi, state.width = pl.DataFrame(schema=_POINT_SCHEMA), None, 1
            state.loaded_at = time.time()
            return
        lo, hi = lohi
        nb = max(1, self.max_points // 2)
        width = next((w for w in WIDTHS if hi // w - lo // w + 1 <= nb), WIDTHS[-1])
        plans: dict[str, RollupPlan] = {}
        sizes = [s for s in ROLLUP_BUCKETS if width % s == 0]
        if sizes:
            # Buckets of whole rollup buckets: usable rollups stand in for the path's raw rows, the
            # coarsest that nest in a display bucket (the same minimum and maximum per display
            # bucket, from a tenth or a hundredth of the rows).
            plans = _plans(store, run, signals, path, max(sizes))
        src, params = _source_sql(run, signals, path, -(2**62), plans, _raw_beyond_plans(store, run, plans, memo))
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
        self._finish(state, points)
        if _buckets_per_series(state.points) > max(1, self.max_points // 2):
            # A ladder step that is not nested (64 -> 100, 800 -> 1,000, ...) stopped the coarsening,
            # possibly after nested steps taken first (400 -> 800): read in full at the span's width.
            self._load_full(store, run, signals, path, state)

    @staticmethod
    def _span(store: Store, run: str, signals: Sequence[Signal],
              memo: dict[str, Any] | None = None) -> tuple[int, int] | None:
        """First and last step of the signals' rows (from rollups plus the raw tail where possible).
        ``memo``: see :func:`_step_extremes`."""
        memo = {} if memo is None else memo
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
                # The whole table's step range from Parquet footers (no row decoded; None where it cannot
                # tell): when it lies within the rollups' cover, no raw row of these keys lies outside
                # it, and the two raw scans below (~0.2 CPU-s cold on a 1M x 108 store) are skipped.
                ext = _step_extremes(store, run, table, memo)
                known = ext is not None and ext[0] is not None
                tail = ((None,) if known and int(ext[1]) <= int(cover[1]) else  # type: ignore[index]
                        store.sql(f"SELECT max(step) FROM {table} WHERE run = ? AND {col} IN ({marks}) AND step > ?",
                                  [run, *names, int(cover[1])]).fetchone())
                # Rows of a rolled-back attempt may lie beyond the rollups' last step: the tail covers them.
                first = ((None,) if known and int(ext[0]) >= int(cover[0]) else  # type: ignore[index]
                         store.sql(f"SELECT min(step) FROM {table} WHERE run = ? AND {col} IN ({marks}) AND step < ?",
                                   [run, *names, int(cover[0])]).fetchone())
                row = (min(int(cover[0]), first[0]) if first and first[0] is not None else int(cover[0]),
                       max(int(cover[1]), tail[0]) if tail and tail[0] is not None else int(cover[1]))
            else:
                row = store.sql(f"SELECT min(step), max(step) FROM {table} WHERE run = ? AND {col} IN ({marks})",
                                [run, *names]).fetchone()
            if row and row[0] is not None:
                lo = row[0] if lo is None else min(lo, row[0])
                hi = row[1] if hi is None else max(hi, row[1])
        return None if lo is None else (int(lo), int(hi))


def _step_extremes(store: Store, run: str, table: str, memo: dict[str, Any]) -> tuple[Any, Any] | None:
    """``(min, max)`` step of ``run``'s ``table`` from Parquet footers (:meth:`Store.run_extremes`), or
    None where it cannot tell; ``memo`` keeps the answer for the other readers of one load (the walk
    over every row group's statistics is ~0.1 CPU-s on a 1M x 108 run)."""
    if table not in memo:
        extremes = getattr(store, "run_extremes", None)
        memo[table] = (extremes(table, run, ["step"]) or {}).get("step") if extremes is not None else None
    return memo[table]


def _raw_beyond_plans(store: Store, run: str, plans: dict[str, RollupPlan],
                      memo: dict[str, Any] | None = None) -> frozenset[str]:
    """Tables of ``plans`` whose raw rows all lie below the plan's lowest limit, told by Parquet footers
    (:meth:`Store.run_extremes`; no row decoded): nothing is left to the raw read of such a table.

    Only for a plan without rows of other attempts (``others`` False): then the raw read selects
    rows at or after an attempt's limit (its live tail and its ghosts, which lie at or after its cut,
    itself at or above the limit), and a table whose highest step is below every limit has none. A
    whole-run chart of a run whose rollups are current then scans no raw segment at all (the raw
    part of a 1M x 108 MaxVio chart cost ~0.24 CPU-s cold in footers for no row).
    """
    memo = {} if memo is None else memo
    out = set()
    for table, p in plans.items():
        if not p.used or p.others:
            continue
        ext = _step_extremes(store, run, table, memo)
        if ext is None:
            continue  # cannot tell: read
        if ext[1] is None or int(ext[1]) < min(lim for _, lim in p.limits):
            out.add(table)
    return frozenset(out)


def _downsample_sql(source: str, max_points: int) -> str:
    """Min/max downsampling of ``source`` (columns step, tokens, value, attempt, superseded)."""
    nb = max(1, max_points // 2)
    # One hash aggregation per bucket (arg_min/arg_max) instead of two window sorts of every row:
    # the same rows are picked (minimum: smallest value, NULLs last, then earliest step; maximum:
    # largest value with NaN largest, NULLs last, then earliest step; ties: earliest attempt), ~5x faster.
    return f"""
    WITH s AS MATERIALIZED ({source}),
    st AS (SELECT count(*) AS n, min(step) AS lo, max(step) AS hi FROM s),
    picked AS (
        SELECT s.superseded,
               arg_min({{'step': s.step, 'tokens': s.tokens, 'value': s.value, 'attempt': s.attempt}},
                       (s.value IS NULL, s.value, s.step, s.attempt)) AS pmin,
               arg_max({{'step': s.step, 'tokens': s.tokens, 'value': s.value, 'attempt': s.attempt}},
                       (s.value IS NOT NULL, s.value, -s.step, -s.attempt)) AS pmax
        FROM s, st
        WHERE st.n > {int(max_points)}
        GROUP BY s.superseded,
                 CASE WHEN st.hi = st.lo THEN 0
                      ELSE floor((s.step - st.lo) * {nb}::DOUBLE / (st.hi - st.lo + 1))::BIGINT END
    ),
    rows AS (
        SELECT superseded, unnest(CASE WHEN pmin = pmax THEN [pmin] ELSE [pmin, pmax] END) AS r FROM picked
    )
    SELECT step, tokens, value, attempt, superseded FROM s WHERE (SELECT n FROM st) <= {int(max_points)}
    UNION ALL
    SELECT r.step, r.tokens, r.value, r.attempt, superseded FROM rows
    ORDER BY superseded, step
    """


_SERIES_SCHEMA = {"step": pl.Int64, "tokens": pl.Int64, "value": pl.Float64, "attempt": pl.Int32,
                  "superseded": pl.Boolean}


def _series_direct(store: Store, run: str, name: str, layer: int | None, max_points: int, step_min: int | None,
                   step_max: int | None, include_superseded: bool, attempt: int | None) -> pl.DataFrame | None:
    """:func:`series` over raw rows read with :meth:`Store.scan_run`, or None (then SQL answers).

    Only when the answer needs no downsampling (at most ``max_points`` rows): then it is exactly
    the rows, on the path of ``attempt`` (:meth:`Timeline.superseded_mask`, the one rule), sorted
    like the SQL answer. Anything else — more rows, a store that cannot scan — returns None.
    """
    scanned = scanned_timeline(store, run, attempt)
    if scanned is None:
        return None
    scan, path = scanned
    lo = -(2**62) if step_min is None else int(step_min)
    hi = 2**62 if step_max is None else int(step_max)
    # Step first: a segment of other steps is ruled out by its first statistic looked at.
    if layer is None:
        table, ranges = "scalars", {"step": (lo, hi), "name": (name, name)}
    else:
        table, ranges = "layer_stats", {"step": (lo, hi), "metric": (name, name), "layer": (int(layer), int(layer))}
    # NumPy arrays, not a polars frame: polars' first queries in a process cost more CPU than the
    # whole 2,000-row answer (scan_arrays has no NULLs: the rule needs no fill).
    rows = scan(table, run, ["step", "tokens", "value", "attempt"], ranges)
    if rows is None:
        return None
    sup = np.asarray(path.superseded_mask(rows["attempt"], rows["step"]), dtype=bool)
    if sup.shape != rows["step"].shape:
        sup = np.broadcast_to(sup, rows["step"].shape)  # no cut: the rule is a scalar
    keep = None if include_superseded else ~sup
    cols = {**rows, "superseded": sup}
    if keep is not None:
        cols = {k: v[keep] for k, v in cols.items()}
    if len(cols["step"]) > max_points:
        return None  # downsampling: the SQL path (one definition of the min/max picks)
    order = np.lexsort((cols["attempt"], cols["step"], cols["superseded"]))  # stable, last key first
    types = {"step": pa.int64(), "tokens": pa.int64(), "value": pa.float64(), "attempt": pa.int32(),
             "superseded": pa.bool_()}
    out = pl.from_arrow(pa.table({k: _arrow_of(cols[k][order], t) for k, t in types.items()}))
    assert isinstance(out, pl.DataFrame)
    return out


def _arrow_of(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A NULL-free NumPy array as an Arrow array of ``type_``, built from its buffer (``pa.array``
    imports pandas on first use: ~0.5 s of a fresh process)."""
    if pa.types.is_boolean(type_):
        data = np.packbits(values.astype(bool, copy=False), bitorder="little")
    else:
        data = np.ascontiguousarray(values, dtype=type_.to_pandas_dtype())
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(data)])


#: Rollup columns the whole-series SQL reads (besides ``run``, ``bucket_size`` and the key columns).
_ROLLUP_COLS = ("attempt", "bucket", "n", "step_vmin", "tokens_vmin", "vmin", "step_vmax", "tokens_vmax", "vmax")


def _series_rollup_direct(store: Store, run: str, name: str, layer: int | None, max_points: int,
                          include_superseded: bool, attempt: int | None) -> pl.DataFrame | None:
    """:func:`series` of a whole run from rows read with :meth:`Store.scan_run`, or None (then SQL answers).

    Reads the key's 100-step rollup rows and the raw rows at or after the lowest rollup limit (the
    live tail), applies the one validity rule (:func:`~healthwatch.query.rollups.plan_of`) and runs
    the very SQL of the view path (:func:`_source_sql` + :func:`_downsample_sql`) over just those
    rows (:meth:`Store.sql_over`): no DuckDB scan prunes ~3,000 row groups of ~65 files per query.
    Falls back (None) where that read would not be small: no usable rollups, a store that cannot
    scan, rows of attempts without rollups (they may lie at any step), or a series short enough to
    be read raw in full.
    """
    from healthwatch.query.rollups import plan_of

    scanned = scanned_path(store, run, attempt)
    if scanned is None:
        return None
    scan, _att, path = scanned
    table = "scalars" if layer is None else "layer_stats"
    key: dict[str, tuple[Any, Any]] = ({"name": (name, name)} if layer is None
                                       else {"metric": (name, name), "layer": (int(layer), int(layer))})
    # Each rollup file's section of this bucket size and name/metric is decoded once per open
    # Store: the next layer's series is a filter over memory (see Store.scan_run's ``cache``).
    section = ("bucket_size", "name" if layer is None else "metric")
    held: list[Any] = []  # attempts_present, asked once for every size below

    def present() -> Any:
        if not held:
            held.append(store.attempts_present(table, run))
        return held[0]

    for size in sorted(ROLLUP_BUCKETS, reverse=True):
        roll = scan(f"{table}_rollup", run, list(_ROLLUP_COLS), {"bucket_size": (size, size), **key}, cache=section)
        if roll is None:
            return None
        tops = roll.group_by("attempt").agg(pl.col("bucket").max()).rows()
        p = plan_of(tops, path, size, present)
        usable = pl.lit(False)
        for a, lim in p.limits:
            usable = usable | ((pl.col("attempt") == a) & (pl.col("bucket") < lim // size))
        rows = roll.filter(usable)
        if size == ROLLUP_BUCKETS[0] or _coarse_enough(p, rows.height, max_points):
            break
    if not p.used or p.others:
        return None
    if int(rows["n"].sum()) <= max_points:
        return None  # short enough to read raw, exactly: the SQL path
    tail = min(lim for _, lim in p.limits)
    raw = scan(table, run, ["step", "tokens", "value", "attempt"], {"step": (tail, 2**62), **key})
    if raw is None:
        return None
    if not include_superseded:
        # The path's rows only: the same rows and picks as the SQL below, in polars (a DuckDB
        # statement over two registered frames cost ~10-20 ms of CPU, more than the read).
        out = _downsample_frame(rows, raw, p, path, layer is not None, max_points)
        if out is not None:
            return out
    consts = [pl.lit(run).alias("run")] + (
        [pl.lit(name).alias("name")] if layer is None
        else [pl.lit(name).alias("metric"), pl.lit(int(layer)).cast(pl.Int32).alias("layer")])
    frames = {f"{table}_rollup": roll.with_columns(*consts, pl.lit(size).cast(pl.Int64).alias("bucket_size")),
              table: raw.with_columns(*consts)}
    sig = Signal(name) if layer is None else Signal(name, "max", (int(layer), int(layer)))
    src, params = _source_sql(run, [sig], path, -(2**62), {table: p})
    cond = "" if include_superseded else " WHERE NOT superseded"
    source = f"SELECT step, tokens, value, attempt, superseded FROM ({src}){cond}"
    return store.sql_over(frames, _downsample_sql(source, max_points), params)


def _downsample_frame(roll: pl.DataFrame, raw: pl.DataFrame, p: RollupPlan, path: Timeline, per_step: bool,
                      max_points: int) -> pl.DataFrame | None:
    """:func:`_downsample_sql` over :func:`_source_sql`'s on-path rows, without SQL, or None.

    ``roll``: the usable rollup rows of ``p`` (each gives its minimum and maximum at their own
    step, ``attempt`` NULL); ``raw``: raw rows read from the lowest limit on, of which those of an
    attempt at or after its limit and on ``path`` are kept. The picks are the SQL's: per bucket
    the smallest value (NULLs last, NaN above every number, then the earliest step) and the
    largest (NaN first, NULLs last, then the earliest step), one row where both are the same row
    (NULL equals NULL, NaN equals NaN, as DuckDB compares structs), sorted by step. None (the SQL
    answers) where the SQL's own ties could pick otherwise: a raw step held twice, a NULL attempt.
    """
    if raw["attempt"].null_count() or (per_step and raw["step"].is_duplicated().any()):
        return None
    keep = pl.lit(False)
    for a, lim in p.limits:
        keep = keep | ((pl.col("attempt") == a) & (pl.col("step") >= lim))
    raw = raw.filter(keep & ~path.superseded_mask(pl.col("attempt"), pl.col("step")))
    cols = {"step": pl.Int64, "tokens": pl.Int64, "value": pl.Float64, "attempt": pl.Int32}
    cand = [roll.select(pl.col(f"step_{e}").alias("step"), pl.col(f"tokens_{e}").alias("tokens"),
                        pl.col(e).alias("value"), pl.lit(None, pl.Int32).alias("attempt")) for e in ("vmin", "vmax")]
    rows = pl.concat([f.select([pl.col(k).cast(v) for k, v in cols.items()]) for f in (*cand, raw)])
    out_cols = [*cols, "superseded"]
    if rows.height <= max_points:
        return rows.sort("step").with_columns(pl.lit(False).alias("superseded")).select(out_cols)
    nb = max(1, max_points // 2)
    lo, hi = int(rows["step"].min()), int(rows["step"].max())  # type: ignore[arg-type]
    b = (pl.lit(0, pl.Int64) if hi == lo else
         ((pl.col("step") - lo).cast(pl.Float64) * float(nb) / float(hi - lo + 1)).floor().cast(pl.Int64))
    rows = rows.with_columns(b.alias("_b"))
    mn = rows.sort(["value", "step"], nulls_last=True).group_by("_b", maintain_order=True).first()
    mx = rows.sort(["value", "step"], descending=[True, False], nulls_last=True).group_by(
        "_b", maintain_order=True).first()
    same = pl.all_horizontal([pl.col(c).eq_missing(pl.col(f"{c}_x")) for c in ("step", "tokens", "attempt")]) & (
        pl.col("value").eq_missing(pl.col("value_x")) | (pl.col("value").is_nan() & pl.col("value_x").is_nan()))
    both = mn.join(mx, on="_b", suffix="_x")
    extra = mx.join(both.filter(~same.fill_null(False)).select("_b"), on="_b")
    return (pl.concat([mn.select(list(cols)), extra.select(list(cols))]).sort("step")
            .with_columns(pl.lit(False).alias("superseded")).select(out_cols))


def _coarse_enough(p: RollupPlan, usable: int, max_points: int) -> bool:
    """Whether a whole-run series reads ``p``'s rollups (a size above the finest): ``usable`` of its
    rows serve the path, no attempt without them holds rows, and they give at least 90 % of the
    ``max_points // 2`` buckets the downsampling draws (each a minimum and a maximum at their own
    steps). A million-step series at 2,000 points so reads ~1,000 1,000-step rollup rows, not
    10,000 100-step ones; a shorter run keeps the finer rollups and its full resolution. One rule
    for the view path and the pyarrow path (they must answer the same)."""
    return p.used and not p.others and 10 * usable >= 9 * max(1, max_points // 2)


def _whole_plan(store: Store, run: str, table: str, key_sql: str, kp: list[Any], path: Timeline,
                max_points: int) -> RollupPlan:
    """The rollup plan a whole-run series reads over the views: the coarsest size
    :func:`_coarse_enough` accepts, else the finest (100-step) plan."""
    for size in sorted(ROLLUP_BUCKETS, reverse=True)[:-1]:
        p = plan(store, run, table, path, size, key_sql, kp)
        if not p.used or p.others:
            continue
        rp: list[Any] = []
        pred = p.rollup_pred(rp)
        row = store.sql(f"SELECT count(*) FROM {table}_rollup WHERE run = ?{key_sql} AND bucket_size = ? AND {pred}",
                        [run, *kp, size, *rp]).fetchone()
        if _coarse_enough(p, int(row[0]) if row else 0, max_points):
            return p
    return plan(store, run, table, path, ROLLUP_BUCKETS[0], key_sql, kp)


@per_run
def series(
    store: Store,
    run: str,
    name: str,
    *,
    layer: int | None = None,
    max_points: int = MAX_POINTS,
    step_min: int | None = None,
    step_max: int | None = None,
    include_superseded: bool = False,
    use_rollups: bool = True,
    attempt: int | None = None,
) -> pl.DataFrame:
    """One series as ``(step, tokens, value, attempt, superseded)``, min/max-downsampled to ≤ ``max_points``.

    ``name`` is a scalar name (``loss/train``) or, with ``layer``, a layer metric (``resid_rms``).
    ``attempt`` picks the path (None: effective); with ``include_superseded`` the rows off it are
    included and flagged. A whole long series reads valid rollups where they exist (the coarsest
    that :func:`_coarse_enough` accepts, else 100-step ones): each rollup bucket's minimum and
    maximum are candidates at their own steps and tokens, with ``attempt`` NULL.
    """
    if step_min is not None or step_max is not None or not use_rollups:
        # A bounded read (or one that never uses rollups) of few rows: answered from the run's own
        # segments with pyarrow, without a DuckDB connection (the cheap open of a fresh process).
        direct = _series_direct(store, run, name, layer, max_points, step_min, step_max, include_superseded, attempt)
        if direct is not None:
            return direct
    if use_rollups and step_min is None and step_max is None and getattr(store, "_local_root", False):
        # A whole series (a layer's or a scalar's): its rollup rows, from the per-Store section cache,
        # and the live tail read with pyarrow, then the view path's rule over just those rows. At 1M
        # steps: a layer 10-20 ms of CPU, the loss 13 ms against 90 ms for the SQL over the views.
        whole = _series_rollup_direct(store, run, name, layer, max_points, include_superseded, attempt)
        if whole is not None:
            return whole
    sig = Signal(name) if layer is None else Signal(name, "max", (int(layer), int(layer)))
    path = timeline(store, run, attempt)
    plans: dict[str, RollupPlan] = {}
    if use_rollups and step_min is None and step_max is None:
        table = "scalars" if layer is None else "layer_stats"
        key_sql = " AND name = ?" if layer is None else " AND metric = ? AND layer = ?"
        p = _whole_plan(store, run, table, key_sql, [name] if layer is None else [name, int(layer)], path, max_points)
        plans = {table: p}
        if p.used:
            rp: list[Any] = []
            pred = p.rollup_pred(rp)
            key = "name = ?" if layer is None else "metric = ? AND layer = ?"
            kp: list[Any] = [name] if layer is None else [name, int(layer)]
            row = store.sql(f"SELECT sum(n) FROM {table}_rollup WHERE run = ? AND {key} AND bucket_size = ? AND {pred}",
                            [run, *kp, p.size, *rp]).fetchone()
            if row is None or row[0] is None or int(row[0]) <= max_points:
                plans = {}  # short enough to read raw, exactly
    src, params = _source_sql(run, [sig], path, -(2**62) if step_min is None else int(step_min), plans)
    cond = " WHERE true"
    if step_max is not None:
        cond += " AND step <= ?"
        params.append(int(step_max))
    if not include_superseded:
        cond += " AND NOT superseded"
    source = f"SELECT step, tokens, value, attempt, superseded FROM ({src}){cond}"
    return store.sql(_downsample_sql(source, max_points), params).pl()


@per_run
def series_many(
    store: Store, run: str, names: list[str], *, max_points: int = MAX_POINTS, include_superseded: bool = False
) -> pl.DataFrame:
    """Several scalar series at once, each downsampled like :func:`series`; adds a ``name`` column."""
    frames = []
    for name in names:
        df = series(store, run, name, max_points=max_points, include_superseded=include_superseded)
        frames.append(df.with_columns(pl.lit(name).alias("name")))
    return pl.concat(frames) if frames else pl.DataFrame()


@per_run
def layer_aggregate(store: Store, run: str, metric: str, agg: Agg = "max", max_points: int = MAX_POINTS) -> pl.DataFrame:
    """Per-step aggregate over layers of one layer metric (effective rows) as ``(step, tokens, value)``,
    min/max-downsampled in SQL."""
    pts = SeriesCache(max_points).get(store, run, [Signal(metric, agg)], include_superseded=False)
    return pts.filter(~pl.col("superseded")).select("step", "tokens", "value")
