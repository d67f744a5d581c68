"""Grids over layers: layer x step heatmaps, per-layer profiles, expert load, and what was logged.

Heatmaps are bucketed in SQL. For a whole run, rollups of every level that fits a display bucket
serve each attempt's rows below their valid limit (:mod:`healthwatch.query.rollups`), the
coarsest first, and raw rows the rest; partial aggregates (min, max, sum, count, last) combine
exactly, so the grid is the same before and after any merge, rollup or compaction.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl

from healthwatch.query.rollups import coarsest, display_width, plan
from healthwatch.query.runs import scanned_path, timeline
from healthwatch.query.timeline import Timeline
from healthwatch.store import ROLLUP_BUCKETS, Store
from healthwatch.store.reader import per_run

HeatAgg = Literal["mean", "max", "min", "last"]
_HEAT_SCHEMA = {"layer": pl.Int32, "layer_type": pl.Utf8, "step": pl.Int64, "value": pl.Float64}
_PROFILE_SCHEMA = {"asked": pl.Int64, "step": pl.Int64, "tokens": pl.Int64, "layer": pl.Int32, "layer_type": pl.Utf8,
                   "value": pl.Float64}
#: Steps below an asked step searched first for the nearest logged one (then the whole history).
_PROFILE_WINDOW = 10_000
_FINAL = {"mean": "sum(vsum) / sum(n)", "max": "max(vmax)", "min": "min(vmin)", "last": "arg_max(vlast, laststep)"}


def _span(store: Store, run: str, metric: str, path: Timeline, step_min: int | None, step_max: int | None,
          use_rollups: bool, size: int = ROLLUP_BUCKETS[-1]) -> tuple[int, int] | None:
    """First and last step of ``metric`` on ``path`` (within the range), from ``size``-step rollups plus raw rows."""
    lo = hi = None
    params: list[Any] = [run, metric]
    rng = ""
    if step_min is not None:
        rng += " AND step >= ?"
        params.append(int(step_min))
    if step_max is not None:
        rng += " AND step <= ?"
        params.append(int(step_max))
    conds: list[str] = [""]
    cps: list[list[Any]] = [[]]
    if use_rollups:
        p = plan(store, run, "layer_stats", path, size, " AND metric = ?", [metric])
        if p.used:
            rp: list[Any] = []
            pred = p.rollup_pred(rp)
            row = store.sql(f"SELECT min(step_min), max(step_max) FROM layer_stats_rollup WHERE run = ? AND metric = ? "
                            f"AND bucket_size = ? AND {pred}", [run, metric, p.size, *rp]).fetchone()
            if row and row[0] is not None:
                lo, hi = int(row[0]), int(row[1])
            conds, cps = p.raw_conditions(), p.raw_params()  # the raw rows the rollups do not serve: the tail, pruned by statistics
    parts, qp = [], []
    for cond, cp in zip(conds, cps):
        pp: list[Any] = [*params, *cp]
        pred = path.predicate(pp)
        parts.append(f"SELECT min(step) AS lo, max(step) AS hi FROM layer_stats WHERE run = ? AND metric = ?{rng}{cond}{pred}")
        qp += pp
    row = store.sql(f"SELECT min(lo), max(hi) FROM ({' UNION ALL '.join(parts)})", qp).fetchone()
    if row and row[0] is not None:
        lo = int(row[0]) if lo is None else min(lo, int(row[0]))
        hi = int(row[1]) if hi is None else max(hi, int(row[1]))
    return None if lo is None or hi is None else (lo, hi)


@per_run
def heatmap(
    store: Store,
    run: str,
    metric: str,
    max_buckets: int = 400,
    agg: HeatAgg = "mean",
    *,
    step_min: int | None = None,
    step_max: int | None = None,
    attempt: int | None = None,
    use_rollups: bool = True,
) -> pl.DataFrame:
    """A layer x step-bucket grid of one layer metric on a path as ``(layer, layer_type, step, value)``.

    ``step`` is the first step of each bucket; buckets are :func:`~healthwatch.query.rollups.display_width`
    steps wide (at least ``ceil(span / max_buckets)``), aligned on multiples of the width.
    """
    if agg not in _FINAL:
        raise ValueError(f"heatmap agg must be one of {sorted(_FINAL)}, got {agg!r}")
    if step_min is None and step_max is None and use_rollups:
        direct = _heatmap_direct(store, run, metric, max_buckets, agg, attempt)
        if direct is not None:
            return direct
    return _heatmap_sql(store, run, metric, max_buckets, agg, step_min, step_max, attempt, use_rollups)


#: Rollup columns the heatmap's SQL reads (besides ``run`` and ``metric``).
_HEAT_ROLLUP_COLS = ("bucket_size", "bucket", "attempt", "layer", "layer_type", "step_min", "step_max", "n", "vmin",
                     "vmax", "vmean", "vlast")


def _once(fn: Any) -> Any:
    """``fn`` called at most once (the first call's answer is kept)."""
    box: list[Any] = []

    def call() -> Any:
        if not box:
            box.append(fn())
        return box[0]

    return call


def _heatmap_direct(store: Store, run: str, metric: str, max_buckets: int, agg: HeatAgg,
                    attempt: int | None) -> pl.DataFrame | None:
    """:func:`heatmap` of a whole run over rows read with :meth:`Store.scan_run`, or None (then SQL answers).

    Reads the metric's 10,000- and 1,000-step rollup rows, its 100-step rollup rows and raw rows
    from the lowest of their limits on (the live tail) and runs :func:`heatmap`'s own SQL over just
    those rows (:class:`~healthwatch.store.reader.FrameStore`). Every query of it then selects only
    rows the frames hold: each attempt's rollups are used below their limit and raw rows at or
    after it, and every limit it can use is at or above the lowest one read. Falls back (None) for
    a store that cannot scan, attempts with raw rows but no 1,000-step rollups (their rows
    may lie at any step), or a span too short for 1,000-step buckets (it would need every
    100-step rollup row).
    """
    from healthwatch.query.rollups import plan_of
    from healthwatch.store.reader import FrameStore

    scanned = scanned_path(store, run, attempt) if getattr(store, "_local_root", False) else None
    if scanned is None:
        return None
    scan, att, path = scanned
    key = {"metric": (metric, metric)}
    # One read per file for both sizes, decoded once per open Store (the next heatmap, of this
    # metric or after a refresh, filters memory: see Store.scan_run's ``cache``).
    coarse = scan("layer_stats_rollup", run, list(_HEAT_ROLLUP_COLS),
                  {"bucket_size": (ROLLUP_BUCKETS[1], ROLLUP_BUCKETS[-1]), **key}, cache=("bucket_size", "metric"))
    if coarse is None:
        return None
    limits: list[int] = []
    held = _once(lambda: store.attempts_present("layer_stats", run))  # one listing for every plan below
    tops = coarse.group_by("bucket_size", "attempt").agg(pl.col("bucket").max()).rows()
    for size in (ROLLUP_BUCKETS[-1], ROLLUP_BUCKETS[1]):
        p = plan_of([(a, top) for s, a, top in tops if s == size], path, size, held)
        # The 1,000-step plan must serve every attempt with raw rows: the span and every display
        # bucket are then answered from rollups below its limits and raw rows above them. (A young
        # attempt without 10,000-step rollups is fine: the 1,000-step ones serve it.)
        if size == ROLLUP_BUCKETS[1] and (not p.used or p.others):
            return None
        limits += [lim for _, lim in p.limits]
    lo = min(limits)  # no query below reads a rollup row under lo // size or a raw row under lo
    size = ROLLUP_BUCKETS[0]
    fine = scan("layer_stats_rollup", run, list(_HEAT_ROLLUP_COLS),
                {"bucket_size": (size, size), **key, "bucket": (lo // size, 2**62)})
    raw = scan("layer_stats", run, ["attempt", "step", "layer", "layer_type", "value"], {"step": (lo, 2**62), **key})
    if fine is None or raw is None:
        return None
    roll = pl.concat([coarse, fine])
    fast = _heatmap_frames(roll, raw, path, max_buckets, agg, held)
    if fast is not None:
        return fast
    frames = {"attempts": att, "layer_stats_rollup": roll, "layer_stats": raw}
    with FrameStore(store, frames, consts={"run": run, "metric": metric}) as fs:
        span = _span(fs, run, metric, path, None, None, True, ROLLUP_BUCKETS[1])  # type: ignore[arg-type]
        if span is None or (coarsest(display_width(span[0], span[1], max_buckets)) or 0) < ROLLUP_BUCKETS[1]:
            return None
        return _heatmap_sql(fs, run, metric, max_buckets, agg, None, None, attempt, True,  # type: ignore[arg-type]
                            ROLLUP_BUCKETS[1], span)


def _heatmap_frames(roll: pl.DataFrame, raw: pl.DataFrame, path: Timeline, max_buckets: int, agg: HeatAgg,
                    present: Any) -> pl.DataFrame | None:
    """:func:`_span` and :func:`_heatmap_sql` (whole run, rollups on) over the rows
    :func:`_heatmap_direct` read, in polars, or None (then its SQL answers).

    Step for step the SQL's rule: the span from the 1,000-step plan's rollup rows plus the raw rows
    it does not serve; per rollup size that fits a display bucket, coarsest first, each attempt's
    rollup buckets from where the coarser size stopped up to its limit; raw rows the rest; the
    partial aggregates combined per cell as DuckDB does (``max`` with NaN above every number,
    ``min`` skipping NaN unless all are, ``arg_max`` skipping NULL values, ``count`` of rows).
    Copying ~10^5 rollup rows into DuckDB and seven statements over them cost ~90 ms of CPU.
    """
    from healthwatch.query.rollups import plan_of

    tops = roll.group_by("bucket_size", "attempt").agg(pl.col("bucket").max()).rows()  # one pass for every size

    def plan_at(size: int) -> Any:
        return plan_of([(a, top) for s, a, top in tops if s == size], path, size, present)

    if raw["attempt"].null_count() or raw["layer_type"].null_count() or roll["layer_type"].null_count():
        return None  # NULL keys: the SQL's three-valued logic decides, not a copy of it
    on_path = ~path.superseded_mask(pl.col("attempt"), pl.col("step"))
    mid = ROLLUP_BUCKETS[1]
    p = plan_at(mid)
    if not p.used or p.others:
        return None
    usable = pl.lit(False)
    served_raw = pl.lit(False)
    for a, lim in p.limits:
        usable = usable | ((pl.col("attempt") == a) & (pl.col("bucket") < lim // mid))
        served_raw = served_raw | ((pl.col("attempt") == a) & (pl.col("step") >= lim))
    r = roll.filter((pl.col("bucket_size") == mid) & usable).select(pl.col("step_min").min(), pl.col("step_max").max())
    t = raw.filter(served_raw & on_path).select(pl.col("step").min().alias("lo"), pl.col("step").max().alias("hi"))
    los = [v for v in (r.item(0, 0), t.item(0, 0)) if v is not None]
    his = [v for v in (r.item(0, 1), t.item(0, 1)) if v is not None]
    if not los or not his:
        return None
    lo, hi = int(min(los)), int(max(his))
    width = display_width(lo, hi, max_buckets)
    top = coarsest(width)
    if (top or 0) < mid:
        return None
    rows: list[pl.DataFrame] = []  # (layer, b, layer_type, vmin, vmax, vsum, n, vlast, laststep) per source row
    served: dict[int, int] = {}
    for size in sorted((x for x in ROLLUP_BUCKETS if x <= top), reverse=True):  # type: ignore[operator]
        cond = pl.lit(False)
        any_ = False
        for a, lim in plan_at(size).limits:
            start = served.get(a, 0)
            if lim <= start:
                continue
            cond = cond | ((pl.col("attempt") == a) & (pl.col("bucket") >= start // size) & (pl.col("bucket") < lim // size))
            served[a] = lim
            any_ = True
        if any_:
            rows.append(roll.filter((pl.col("bucket_size") == size) & cond).select(
                "layer", ((pl.col("bucket") * size) // width).alias("b"), "layer_type", "vmin", "vmax",
                (pl.col("vmean") * pl.col("n")).alias("vsum"), "n", "vlast", pl.col("step_max").alias("laststep")))
    lims = sorted((a, lim) for a, lim in served.items() if lim > 0)
    keep = pl.lit(False)
    for a, lim in lims:
        keep = keep | ((pl.col("attempt") == a) & (pl.col("step") >= lim))
    keep = (keep | ~pl.col("attempt").is_in([a for a, _ in lims])) if lims else pl.lit(True)
    rows.append(raw.filter(keep & on_path).select(
        "layer", (pl.col("step") // width).alias("b"), "layer_type", pl.col("value").alias("vmin"),
        pl.col("value").alias("vmax"), pl.col("value").alias("vsum"), pl.lit(1, pl.Int64).alias("n"),
        pl.col("value").alias("vlast"), pl.col("step").alias("laststep")))
    types = {"layer": pl.Int64, "b": pl.Int64, "layer_type": pl.Utf8, "vmin": pl.Float64, "vmax": pl.Float64,
             "vsum": pl.Float64, "n": pl.Int64, "vlast": pl.Float64, "laststep": pl.Int64}
    allr = pl.concat([f.cast(types) for f in rows])  # type: ignore[arg-type]
    if allr.height == 0:
        return None
    return _cells(allr, agg, width)


def _cells(rows: pl.DataFrame, agg: HeatAgg, width: int) -> pl.DataFrame | None:
    """Per ``(layer, b)`` cell of partial-aggregate ``rows``, the final value of ``agg``, with numpy
    over dense cell indices (a polars ``group_by`` of ~10^5 rows into ~4x10^4 cells cost ~15 ms
    per aggregate here). Same results as the SQL's: ``max`` is NaN when any part is (NaN above
    every number), ``min`` skips NaN unless all are, ``last`` takes the value at the largest step.
    None (the SQL answers) for NULL values, which numpy cannot tell from NaN."""
    import numpy as np

    need = {"mean": ("vsum", "n"), "max": ("vmax",), "min": ("vmin",), "last": ("vlast", "laststep")}[agg]
    if any(rows[c].null_count() for c in (*need, "layer", "b")):
        return None
    layer = rows["layer"].to_numpy()
    b = rows["b"].to_numpy()
    l0, b0 = int(layer.min()), int(b.min())
    nl, nbk = int(layer.max()) - l0 + 1, int(b.max()) - b0 + 1
    if nl * nbk > 50_000_000:
        return None
    cell = (layer - l0) * nbk + (b - b0)
    size = nl * nbk
    present = np.bincount(cell, minlength=size) > 0
    if agg == "mean":
        value = np.bincount(cell, weights=rows["vsum"].to_numpy(), minlength=size) / np.maximum(
            np.bincount(cell, weights=rows["n"].to_numpy().astype(np.float64), minlength=size), 1e-300)
    elif agg == "max":
        value = np.full(size, -np.inf)
        with np.errstate(invalid="ignore"):  # NaN is an answer here, not a mistake
            np.maximum.at(value, cell, rows["vmax"].to_numpy())  # propagates NaN, as DuckDB's max
    elif agg == "min":
        value = np.full(size, np.nan)
        np.fmin.at(value, cell, rows["vmin"].to_numpy())  # skips NaN unless all are, as DuckDB's min
    else:
        step = rows["laststep"].to_numpy()
        last = np.full(size, np.iinfo(np.int64).min)
        np.maximum.at(last, cell, step)
        at = step == last[cell]
        value = np.full(size, np.nan)
        value[cell[at]] = rows["vlast"].to_numpy()[at]
    idx = np.flatnonzero(present)
    kinds = rows.group_by("layer").agg(pl.col("layer_type").first())
    out = pl.DataFrame({"layer": idx // nbk + l0, "step": (idx % nbk + b0) * width, "value": value[idx]})
    return (out.join(kinds, on="layer", how="left")
            .select("layer", "layer_type", "step", "value").cast(_HEAT_SCHEMA)  # type: ignore[arg-type]
            .sort("layer", "step"))


def _heatmap_sql(store: Store, run: str, metric: str, max_buckets: int, agg: HeatAgg, step_min: int | None,
                 step_max: int | None, attempt: int | None, use_rollups: bool,
                 span_size: int = ROLLUP_BUCKETS[-1], span: tuple[int, int] | None = None) -> pl.DataFrame:
    """:func:`heatmap` in SQL over ``store``'s views (a :class:`Store`, or a FrameStore of rows read);
    ``span_size``: the rollups the span is read from (any size gives the same span); ``span``: the
    span already read from the same store (skips reading it again)."""
    path = timeline(store, run, attempt)
    whole = step_min is None and step_max is None and use_rollups
    if span is None:
        span = _span(store, run, metric, path, step_min, step_max, whole, span_size)
    if span is None:
        return pl.DataFrame(schema=_HEAT_SCHEMA)
    lo, hi = span
    width = display_width(lo, hi, max_buckets)
    parts: list[str] = []
    qp: list[Any] = []
    served: dict[int, int] = {}  # attempt -> first step not served by rollups
    top = coarsest(width) if whole else None
    if top is not None:
        for size in sorted((s for s in ROLLUP_BUCKETS if s <= top), reverse=True):
            p = plan(store, run, "layer_stats", path, size, " AND metric = ?", [metric])
            conds = []
            cp: list[Any] = []
            for a, lim in p.limits:
                start = served.get(a, 0)
                if lim <= start:
                    continue
                conds.append("(attempt = ? AND bucket >= ? AND bucket < ?)")
                cp += [a, start // size, lim // size]
                served[a] = lim
            if not conds:
                continue
            parts.append(
                f"SELECT layer, any_value(layer_type) AS layer_type, (bucket * {int(size)}) // {int(width)} AS b, min(vmin) AS vmin, "
                "max(vmax) AS vmax, sum(vmean * n) AS vsum, sum(n) AS n, arg_max(vlast, step_max) AS vlast, "
                "max(step_max) AS laststep FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ? "
                f"AND ({' OR '.join(conds)}) GROUP BY layer, b")
            qp += [run, metric, size, *cp]
    rp: list[Any] = [run, metric]
    rng = ""
    if step_min is not None:
        rng += " AND step >= ?"
        rp.append(int(step_min))
    if step_max is not None:
        rng += " AND step <= ?"
        rp.append(int(step_max))
    # The raw rows the rollups did not serve, as disjoint plain conjunctions (statistics prune them
    # to the tail): per served attempt its steps from the served limit on, and every other attempt.
    lims = sorted((a, lim) for a, lim in served.items() if lim > 0)
    raw_conds: list[tuple[str, list[Any]]] = [(" AND attempt = ? AND step >= ?", [a, lim]) for a, lim in lims]
    raw_conds.append((f" AND attempt NOT IN ({', '.join('?' for _ in lims)})", [a for a, _ in lims]) if lims
                     else ("", []))
    inner = []
    for cond, cond_params in raw_conds:
        pp = [*rp, *cond_params]
        pred = path.predicate(pp)
        inner.append(f"SELECT layer, layer_type, step, value FROM layer_stats WHERE run = ? AND metric = ?{rng}{cond}{pred}")
        qp += pp
    parts.append(
        f"SELECT layer, any_value(layer_type) AS layer_type, step // {int(width)} AS b, min(value) AS vmin, "
        "max(value) AS vmax, sum(value) AS vsum, count(*) AS n, arg_max(value, step) AS vlast, max(step) AS laststep "
        f"FROM ({' UNION ALL '.join(inner)}) GROUP BY layer, b")
    return store.sql(
        f"SELECT layer::INTEGER AS layer, any_value(layer_type) AS layer_type, (b * {int(width)})::BIGINT AS step, "
        f"{_FINAL[agg]}::DOUBLE AS value FROM ({' UNION ALL '.join(parts)}) GROUP BY layer, b ORDER BY layer, step",
        qp).pl().cast(_HEAT_SCHEMA)  # type: ignore[arg-type]


@per_run
def layer_profiles(store: Store, run: str, metric: str, steps: tuple[int, ...] | list[int],
                   attempt: int | None = None) -> pl.DataFrame:
    """Per-layer values of ``metric`` at the logged step nearest at or before each of ``steps`` on a
    path, as ``(asked, step, tokens, layer, layer_type, value)``."""
    path = timeline(store, run, attempt)
    frames = []
    for asked in steps:
        asked = int(asked)
        # The nearest logged step at or before the asked one: first within a window below it (statistics
        # prune the read to its row groups), the whole history only when the window is empty; then one
        # exact-step read.
        at = None
        for floor in (asked - _PROFILE_WINDOW, None):
            params: list[Any] = [run, metric, asked]
            lo = ""
            if floor is not None:
                lo = " AND step >= ?"
                params.append(floor)
            pred = path.predicate(params)
            at = store.sql(f"SELECT max(step) FROM layer_stats WHERE run = ? AND metric = ? AND step <= ?{lo}{pred}",
                           params).fetchone()
            if at is not None and at[0] is not None:
                break
        if at is None or at[0] is None:
            continue
        p2: list[Any] = [run, metric, int(at[0])]
        pred2 = path.predicate(p2)
        frames.append(store.sql(
            f"SELECT ?::BIGINT AS asked, step, tokens, layer, layer_type, value FROM layer_stats "
            f"WHERE run = ? AND metric = ? AND step = ?{pred2} ORDER BY layer", [asked, *p2]).pl())
    return pl.concat([f.cast(_PROFILE_SCHEMA) for f in frames]) if frames else pl.DataFrame(schema=_PROFILE_SCHEMA)


@per_run
def layer_profile(store: Store, run: str, metric: str, step: int) -> pl.DataFrame:
    """Per-layer values of ``metric`` at the logged step nearest at or before ``step`` (effective path)."""
    return layer_profiles(store, run, metric, (int(step),)).select("layer", "layer_type", "step", "value")


def profile_steps(lo: int, hi: int, rollup_until: int | None = None, n: int = 9) -> list[int]:
    """``n`` evenly spaced steps over ``[lo, hi]`` for profile pickers (``rollup_until`` is ignored)."""
    return sorted({int(lo + (hi - lo) * i // max(1, n - 1)) for i in range(n)})


@per_run
def layer_info(store: Store, run: str) -> pl.DataFrame:
    """Distinct ``(metric, layer, layer_type)`` of ``run`` (from the 10,000-step rollups plus the raw
    rows they do not cover, when there are rollups: a DISTINCT over 10^8 raw rows costs seconds)."""
    p = plan(store, run, "layer_stats", Timeline(None), ROLLUP_BUCKETS[-1])
    if not p.used:
        q, params = "SELECT DISTINCT metric, layer, layer_type FROM layer_stats WHERE run = ?", [run]
    else:
        rp: list[Any] = []
        pred = p.rollup_pred(rp)
        q = ("SELECT DISTINCT metric, layer, layer_type FROM layer_stats_rollup WHERE run = ? AND bucket_size = ? "
             f"AND {pred}")
        params = [run, p.size, *rp]
        for cond, cp in zip(p.raw_conditions(), p.raw_params()):  # the raw tail only (pruned by statistics), not 10^8 rows
            q += f" UNION SELECT DISTINCT metric, layer, layer_type FROM layer_stats WHERE run = ?{cond}"
            params += [run, *cp]
    return store.sql(f"SELECT * FROM ({q}) ORDER BY metric, layer", params).pl()


@per_run
def metric_names(store: Store, run: str, attempt: int | None = None) -> list[str]:
    """Layer metrics with rows on a path of ``run`` (default: effective), sorted.

    From the 10,000-step rollups below their valid limit on the path plus the raw rows they do not
    serve (the tail, pruned by statistics), never a DISTINCT over every raw row (10^8 at 1M steps).
    """
    path = timeline(store, run, attempt)
    p = plan(store, run, "layer_stats", path, ROLLUP_BUCKETS[-1])
    q, params = "", []
    if p.used:
        rp: list[Any] = []
        q = f"SELECT DISTINCT metric FROM layer_stats_rollup WHERE run = ? AND bucket_size = ? AND {p.rollup_pred(rp)}"
        params = [run, p.size, *rp]
    for cond, cp in zip(p.raw_conditions(), p.raw_params()):
        pp: list[Any] = [run, *cp]
        pred = path.predicate(pp)
        q += (" UNION " if q else "") + f"SELECT DISTINCT metric FROM layer_stats WHERE run = ?{cond}{pred}"
        params += pp
    return sorted(r[0] for r in store.sql(q, params).fetchall())


@per_run
def layer_metrics(store: Store, run: str) -> pl.DataFrame:
    """Distinct ``(metric, layer, layer_type)`` logged for a run."""
    return layer_info(store, run)


@per_run
def scalar_names(store: Store, run: str) -> list[str]:
    """Names of the scalars logged for a run, sorted (rollup names plus raw rows they do not cover)."""
    p = plan(store, run, "scalars", Timeline(None), ROLLUP_BUCKETS[-1])
    if not p.used:
        rows = store.sql("SELECT DISTINCT name FROM scalars WHERE run = ?", [run]).fetchall()
    else:
        rp: list[Any] = []
        pred = p.rollup_pred(rp)
        q = f"SELECT DISTINCT name FROM scalars_rollup WHERE run = ? AND bucket_size = ? AND {pred}"
        params = [run, p.size, *rp]
        for cond, cp in zip(p.raw_conditions(), p.raw_params()):
            q += f" UNION SELECT DISTINCT name FROM scalars WHERE run = ?{cond}"
            params += [run, *cp]
        rows = store.sql(q, params).fetchall()
    return sorted(r[0] for r in rows)


@per_run
def expert_load_steps(store: Store, run: str, attempt: int | None = None) -> list[int]:
    """Steps at which expert-load vectors were sampled on a path (default: effective), ascending."""
    params: list[Any] = [run]
    pred = timeline(store, run, attempt).predicate(params)
    return [r[0] for r in store.sql(f"SELECT DISTINCT step FROM expert_load WHERE run = ?{pred} ORDER BY step",
                                    params).fetchall()]


@per_run
def expert_load_at(store: Store, run: str, step: int, attempt: int | None = None) -> pl.DataFrame:
    """Full expert-load vectors ``(layer, step, tokens, counts)`` at the sample at or before ``step``."""
    path = timeline(store, run, attempt)
    params: list[Any] = [run, int(step)]
    pred = path.predicate(params)
    at = store.sql(f"SELECT max(step) FROM expert_load WHERE run = ? AND step <= ?{pred}", params).fetchone()
    if at is None or at[0] is None:
        return pl.DataFrame(schema={"layer": pl.Int32, "step": pl.Int64, "tokens": pl.Int64,
                                    "counts": pl.List(pl.Int64)})
    p2: list[Any] = [run, int(at[0])]
    pred2 = path.predicate(p2)
    return store.sql(f"SELECT layer, step, tokens, counts FROM expert_load WHERE run = ? AND step = ?{pred2} "
                     "ORDER BY layer", p2).pl()
