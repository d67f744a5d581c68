"""Named, parameterised queries used by the app, the alerts and the CLI.

All downsampling happens in SQL and keeps the minimum *and* the maximum of every bucket, so a
single-step spike in a million steps survives into a 2,000-point chart. Heatmaps read the
compaction rollups for the steps they cover and the raw rows after them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import polars as pl

from healthwatch.store import ROLLUP_BUCKETS, Store

Axis = Literal["step", "tokens"]


def _where_range(col: str, lo: int | None, hi: int | None, params: list[Any]) -> str:
    sql = ""
    if lo is not None:
        sql += f" AND {col} >= ?"
        params.append(int(lo))
    if hi is not None:
        sql += f" AND {col} <= ?"
        params.append(int(hi))
    return sql


def rollup_valid_until(store: Store, run: str, table: str = "layer_stats") -> int | None:
    """First step from which ``run``'s 100-step rollups of ``table`` can no longer be used, or None.

    Rollups are written by compaction from the effective rows *at that time*; an attempt started
    after it (a rollback) supersedes rollup rows from its start step on, so they are only used
    below that step, and only for complete buckets.
    """
    rtable = f"{table}_rollup"
    files = [f for f in store.files(rtable, run) if f.exists()]
    if not files:
        return None
    written = max(f.stat().st_mtime for f in files)
    row = store.sql(f"SELECT max(step_max) FROM {rtable} WHERE run = ?", [run]).fetchone()
    if row is None or row[0] is None:
        return None
    size = ROLLUP_BUCKETS[0]
    limit = (int(row[0]) + 1) // size * size  # first step not in a complete bucket
    att = store.sql("SELECT attempt, start_step, started_at FROM attempts WHERE run = ?", [run]).pl()
    # Only a later attempt can supersede rows: the first attempt never does, however close its
    # start is to the compaction (the 1 s slack below would otherwise drop fresh rollups).
    if att.height:
        att = att.filter(pl.col("attempt") > att["attempt"].min())
        newer = att.filter(pl.col("started_at") > written - 1.0)
        if newer.height:
            limit = min(limit, int(newer["start_step"].min()) // size * size)
    return limit if limit > 0 else None


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


def series(
    store: Store,
    run: str,
    name: str,
    *,
    layer: int | None = None,
    max_points: int = 2000,
    step_min: int | None = None,
    step_max: int | None = None,
    include_superseded: bool = False,
    use_rollups: bool = True,
) -> pl.DataFrame:
    """One series as ``(step, tokens, value, attempt, superseded)``, min/max-downsampled to ≤ ``max_points``.

    ``name`` is a scalar name (``loss/train``) or, with ``layer`` given, a layer metric
    (``resid_rms``). Each bucket contributes the row of its minimum and of its maximum (NaN
    counts as the maximum, so a non-finite step is never dropped). With
    ``include_superseded`` the rows of attempts superseded by a rollback are included and flagged.

    A whole long series (no step range) of a compacted run reads the 100-step rollups for the
    steps they validly cover and raw rows after: every extreme is kept exactly, placed at the first
    step of its 100-step bucket, with ``attempt`` NULL (``use_rollups=False`` reads raw rows only).
    """
    params: list[Any] = [run, name]
    if layer is None:
        table, key = "scalars", "run = ? AND name = ?"
    else:
        table, key = "layer_stats", "run = ? AND metric = ? AND layer = ?"
        params.append(int(layer))
    if use_rollups and not include_superseded and step_min is None and step_max is None:
        until = rollup_valid_until(store, run, table)
        size = ROLLUP_BUCKETS[0]
        if until is not None:
            row = store.sql(f"SELECT sum(n) FROM {table}_rollup WHERE {key} AND bucket_size = ? AND bucket * ? < ?",
                            [*params, size, size, until]).fetchone()
            if row is not None and row[0] is not None and int(row[0]) > max_points:
                source = (
                    "SELECT step_min AS step, tokens_min AS tokens, unnest([vmin, vmax]) AS value, "
                    f"NULL::INTEGER AS attempt, false AS superseded FROM {table}_rollup "
                    f"WHERE {key} AND bucket_size = ? AND bucket * ? < ? "
                    f"UNION ALL SELECT step, tokens, value, attempt, false AS superseded FROM {table}_effective "
                    f"WHERE {key} AND step >= ?"
                )
                return store.sql(_downsample_sql(source, max_points), [*params, size, size, until, *params, until]).pl()
    src = f"{table}_all" if include_superseded else f"{table}_effective"
    cond = key + _where_range("step", step_min, step_max, params)
    sup = "superseded" if include_superseded else "false AS superseded"
    return store.sql(_downsample_sql(f"SELECT step, tokens, value, attempt, {sup} FROM {src} WHERE {cond}", max_points),
                     params).pl()


def series_many(
    store: Store, run: str, names: list[str], *, max_points: int = 2000, include_superseded: bool = False
) -> pl.DataFrame:
    """Several scalar series at once, each downsampled like :func:`series`; adds a ``name`` column."""
    frames = []
    for name in names:
        df = series(store, run, name, max_points=max_points, include_superseded=include_superseded)
        frames.append(df.with_columns(pl.lit(name).alias("name")))
    return pl.concat(frames) if frames else pl.DataFrame()


def _rollup_coverage(store: Store, run: str, metric: str, bucket_size: int) -> int | None:
    row = store.sql(
        "SELECT max(step_max) FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ?",
        [run, metric, bucket_size],
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def heatmap(
    store: Store,
    run: str,
    metric: str,
    *,
    max_buckets: int = 400,
    agg: Literal["mean", "max", "min", "last"] = "mean",
    step_min: int | None = None,
    step_max: int | None = None,
) -> pl.DataFrame:
    """A layer x step-bucket grid of one layer metric as ``(layer, layer_type, step, value)``.

    ``step`` is the first step of each bucket; buckets are at least ``ceil(span/max_buckets)``
    steps wide. When compaction rollups cover the range with buckets that fit, they are used
    (≤ 1 % of the raw rows) and only steps after the rollup are read raw.
    """
    params: list[Any] = [run, metric]
    rng = _where_range("step", step_min, step_max, params)
    lohi = None
    if step_min is None and step_max is None:
        # Whole run: the rollup knows the exact first/last step of what it covers, so only the raw
        # rows after it are scanned (a min/max over every raw row cost seconds at 10^8 rows).
        rb = store.sql(
            "SELECT min(step_min), max(step_max) FROM layer_stats_rollup WHERE run = ? AND metric = ? "
            "AND bucket_size = ?", [run, metric, ROLLUP_BUCKETS[0]]
        ).fetchone()
        if rb is not None and rb[0] is not None:
            tail = store.sql(
                "SELECT min(step), max(step) FROM layer_stats_effective WHERE run = ? AND metric = ? AND step > ?",
                [run, metric, int(rb[1])],
            ).fetchone()
            lohi = (min(int(rb[0]), int(tail[0])) if tail and tail[0] is not None else int(rb[0]),
                    max(int(rb[1]), int(tail[1])) if tail and tail[1] is not None else int(rb[1]))
    if lohi is None:
        lohi = store.sql(
            f"SELECT min(step), max(step) FROM layer_stats_effective WHERE run = ? AND metric = ?{rng}", params
        ).fetchone()
    if lohi is None or lohi[0] is None:
        return pl.DataFrame(schema={"layer": pl.Int32, "layer_type": pl.Utf8, "step": pl.Int64, "value": pl.Float64})
    lo, hi = int(lohi[0]), int(lohi[1])
    width = max(1, math.ceil((hi - lo + 1) / max_buckets))
    raw_agg = {"mean": "avg(value)", "max": "max(value)", "min": "min(value)", "last": "arg_max(value, step)"}[agg]
    # Rollup levels that fit the display bucket and exist, coarsest first (a store compacted by an
    # older version has no 1,000-step level). Each level covers what the coarser ones left, up to
    # its last complete bucket; raw rows cover the rest. Reading a partial tail raw instead
    # decodes the tail row group of every layer (~13M rows at 1M steps) for a few thousand rows.
    levels = []
    for size in sorted((b for b in ROLLUP_BUCKETS if b <= width), reverse=True):
        covered = _rollup_coverage(store, run, metric, size)
        if covered is not None:
            levels.append((size, (covered + 1) // size * size))
    parts: list[str] = []
    qparams: list[Any] = []
    cursor = lo
    if levels:
        # Rollup buckets must nest inside display buckets: round the width to a multiple.
        coarsest = levels[0][0]
        width = max(coarsest, -(-width // coarsest) * coarsest)
        r_agg = {
            "mean": "sum(vmean * n) / sum(n)",
            "max": "max(vmax)",
            "min": "min(vmin)",
            "last": "arg_max(vlast, step_max)",
        }[agg]
        for size, end in levels:
            if end <= cursor:
                continue
            parts.append(
                f"SELECT layer, any_value(layer_type) AS layer_type, (bucket * {size}) // {width} AS b, "
                f"{r_agg} AS value FROM layer_stats_rollup WHERE run = ? AND metric = ? AND bucket_size = ? "
                f"AND bucket * {size} >= ? AND bucket * {size} < ? AND bucket * {size} <= ? GROUP BY layer, b"
            )
            qparams += [run, metric, size, (cursor // size) * size if cursor == lo else cursor, end, hi]
            cursor = end
    raw_lo = max(cursor, lo)
    parts.append(
        f"SELECT layer, any_value(layer_type) AS layer_type, step // {width} AS b, {raw_agg} AS value "
        "FROM layer_stats_effective WHERE run = ? AND metric = ? AND step >= ? AND step <= ? GROUP BY layer, b"
    )
    qparams += [run, metric, raw_lo, hi]
    # A display bucket split between rollup and raw is merged again (mean weighting is approximate there).
    final_agg = {"mean": "avg(value)", "max": "max(value)", "min": "min(value)", "last": "last(value)"}[agg]
    query = (
        f"SELECT layer::INTEGER AS layer, any_value(layer_type) AS layer_type, (b * {width})::BIGINT AS step, "
        f"{final_agg} AS value FROM ({' UNION ALL '.join(parts)}) GROUP BY layer, b ORDER BY layer, step"
    )
    return store.sql(query, qparams).pl()


def layer_profile(store: Store, run: str, metric: str, step: int) -> pl.DataFrame:
    """Per-layer values of ``metric`` at the logged step nearest at or before ``step``."""
    return store.sql(
        """
        WITH s AS (SELECT max(step) AS st FROM layer_stats_effective WHERE run = ? AND metric = ? AND step <= ?)
        SELECT layer, layer_type, step, value FROM layer_stats_effective, s
        WHERE run = ? AND metric = ? AND step = s.st ORDER BY layer
        """,
        [run, metric, int(step), run, metric],
    ).pl()


def layer_metrics(store: Store, run: str) -> pl.DataFrame:
    """Distinct ``(metric, layer, layer_type)`` logged for a run."""
    return store.sql(
        "SELECT DISTINCT metric, layer, layer_type FROM layer_stats WHERE run = ? ORDER BY metric, layer", [run]
    ).pl()


def scalar_names(store: Store, run: str) -> list[str]:
    """Names of the scalars logged for a run, sorted."""
    return [r[0] for r in store.sql("SELECT DISTINCT name FROM scalars WHERE run = ? ORDER BY name", [run]).fetchall()]


def layer_aggregate(
    store: Store, run: str, metric: str, agg: Literal["max", "median", "mean", "min"] = "max", max_points: int = 2000
) -> pl.DataFrame:
    """Per-step aggregate over layers of one layer metric (e.g. MaxVio max and median) as ``(step, tokens, value)``."""
    fn = {"max": "max(value)", "median": "median(value)", "mean": "avg(value)", "min": "min(value)"}[agg]
    df = store.sql(
        f"SELECT step, any_value(tokens) AS tokens, {fn} AS value FROM layer_stats_effective "
        "WHERE run = ? AND metric = ? GROUP BY step ORDER BY step",
        [run, metric],
    ).pl()
    if df.height <= max_points:
        return df
    nb = max(1, max_points // 2)
    lo, hi = df["step"].min(), df["step"].max()
    df = df.with_columns(((pl.col("step") - lo) * nb // (hi - lo + 1)).alias("_b"))
    keep = pl.concat(
        [df.sort("value").group_by("_b").first(), df.sort("value").group_by("_b").last()]
    ).unique(subset=["step"])
    return keep.drop("_b").sort("step")


def expert_load_at(store: Store, run: str, step: int) -> pl.DataFrame:
    """Full expert-load vectors ``(layer, step, counts)`` at the sampled step nearest at or before ``step``."""
    return store.sql(
        """
        WITH s AS (SELECT max(step) AS st FROM expert_load_effective WHERE run = ? AND step <= ?)
        SELECT layer, step, tokens, counts FROM expert_load_effective, s WHERE run = ? AND step = s.st ORDER BY layer
        """,
        [run, int(step), run],
    ).pl()


def runs_overview(store: Store) -> pl.DataFrame:
    """One row per run: lineage, precision, attempts, last step/tokens and last write time."""
    return store.sql(
        """
        WITH last AS (
            SELECT run, max(step) AS last_step, max(tokens) AS last_tokens, max(wall_time) AS last_write,
                   count(DISTINCT attempt) AS attempts_logged
            FROM scalars GROUP BY run
        ),
        att AS (SELECT run, count(*) AS attempts, max(started_at) AS last_start FROM attempts GROUP BY run)
        SELECT r.run, r.parent, r.branch_step, r.branch_tokens, r.precision, r.created,
               coalesce(att.attempts, 0) AS attempts, last.last_step, last.last_tokens, last.last_write
        FROM runs r LEFT JOIN last USING (run) LEFT JOIN att USING (run)
        ORDER BY r.created
        """
    ).pl()


def events(store: Store, run: str, include_superseded: bool = True) -> pl.DataFrame:
    """Events of a run (checkpoints, rollbacks, notes) with a ``superseded`` flag."""
    src = "events_all" if include_superseded else "events_effective"
    sup = "superseded" if include_superseded else "false AS superseded"
    return store.sql(
        f"SELECT step, tokens, attempt, kind, message, wall_time, {sup} FROM {src} WHERE run = ? ORDER BY step",
        [run],
    ).pl()


def lineage(store: Store, run: str) -> pl.DataFrame:
    """The whole tree containing ``run``: its root ancestor and every descendant, with ``depth``.

    A parent that is named but absent from the store appears with ``missing = true`` so the
    caller can say so instead of failing.
    """
    return store.sql(
        """
        WITH RECURSIVE up(run, parent, depth) AS (
            SELECT run, parent, 0 FROM runs WHERE run = ?
            UNION ALL
            SELECT r.run, r.parent, up.depth + 1 FROM runs r JOIN up ON r.run = up.parent WHERE up.depth < 64
        ),
        root AS (SELECT run FROM up ORDER BY depth DESC LIMIT 1),
        down(run, parent, depth) AS (
            SELECT run, parent, 0 FROM runs WHERE run = (SELECT run FROM root)
            UNION ALL
            SELECT r.run, r.parent, down.depth + 1 FROM runs r JOIN down ON r.parent = down.run WHERE down.depth < 64
        )
        SELECT d.run, d.parent, d.depth, r.precision, r.branch_step, r.branch_tokens,
               d.parent IS NOT NULL AND d.parent NOT IN (SELECT run FROM runs) AS missing_parent
        FROM down d JOIN runs r USING (run) ORDER BY d.depth, d.run
        """,
        [run],
    ).pl()
