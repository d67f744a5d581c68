"""Detectors compiled to DuckDB SQL and evaluated incrementally.

Every detector becomes one query over the store's ``*_effective`` views that returns, per run
(and per layer for per-layer selectors), one *observation* per logged step after the run's cursor:

    run, layer (instance key, NULL unless per-layer), at_layer (layer the value came from),
    step, tokens, value, active (bool), detail (text for annotations)

Incremental: a cursor table ``cur(run, since)`` (the last step already evaluated per run) is a
query parameter; each detector reads back only the history its windows need (``lookback``) and
emits steps ``> since``. Composite detectors (``all``, ``leads``) compile their parts into CTEs of
the same query and hold back steps that not every part has data for yet, so a flush of the
scalars that lands before the layer stats of the same steps cannot produce a false "not yet".

User values reach DuckDB only as bound parameters (``$p0``, ``$p1``, …); what is written into the
SQL text is limited to validated integers/floats (window lengths, which DuckDB cannot bind in a
frame clause) and fixed view names. The ``sql`` detector's query is user SQL by definition: it is
validated as a single read-only ``SELECT`` and only ever runs as a subquery.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from healthwatch.alerts.rules import All, Expr, Gap, Leads, NonFinite, Selector, Spike, Sql, Threshold, Trend
from healthwatch.store import Store, duck

#: Cursor of a run that was never evaluated (far below any real step, and safe to subtract from).
NEVER = -(2**60)

#: Columns (and polars types) of every detector's output.
OBS_SCHEMA: dict[str, Any] = {
    "run": pl.Utf8,
    "layer": pl.Int32,
    "at_layer": pl.Int32,
    "step": pl.Int64,
    "tokens": pl.Int64,
    "value": pl.Float64,
    "active": pl.Boolean,
    "detail": pl.Utf8,
}
_COLS = "run, layer, at_layer, step, tokens, value, active, detail, since"

#: 1.4826 * MAD estimates the standard deviation of normally distributed noise.
MAD_TO_SIGMA = 1.4826


def empty_observations() -> pl.DataFrame:
    """An empty observation frame with the standard schema."""
    return pl.DataFrame(schema=OBS_SCHEMA)


@dataclass
class Sources:
    """The views detectors read: the effective views, or the path of one attempt (backtests)."""

    scalars: str = "scalars_effective"
    layers: str = "layer_stats_effective"

    @classmethod
    def attempt_path(cls, attempt: int) -> Sources:
        """Rows as attempt ``attempt`` saw them: attempts ≤ it, each cut at the next one's start.

        This is the diverged path of a run that was later rolled back (the effective views hide it).
        """
        from healthwatch.query.timeline import path_view_sql  # the one rule of superseded rows

        def view(table: str) -> str:
            return f"({path_view_sql(table, int(attempt))})"

        return cls(scalars=view("scalars"), layers=view("layer_stats"))


@dataclass
class _Query:
    """A query being built: named parameters and CTEs, in dependency order.

    ``prefix`` namespaces the CTE and parameter names so several rules' queries can be joined
    into one statement (one DuckDB round trip per evaluation instead of one per rule).
    ``on_snapshot``: the query runs on a :class:`Snapshot` (``sql`` detectors then see only the
    window their ``lookback`` asks for, see :func:`_sql`).
    """

    sources: Sources
    prefix: str = ""
    on_snapshot: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    ctes: list[tuple[str, str]] = field(default_factory=list)
    sql_columns: dict[str, list[str]] = field(default_factory=dict)
    _n: int = 0

    @property
    def cur(self) -> str:
        """Name of this query's cursor CTE ``(run, since)``."""
        return f"{self.prefix}cur"

    def p(self, value: Any) -> str:
        self._n += 1
        name = f"{self.prefix}p{self._n}"
        self.params[name] = value
        return f"${name}"

    def cte(self, body: str) -> str:
        name = f"{self.prefix}c{len(self.ctes)}"
        self.ctes.append((name, body))
        return name

    def sql(self, final: str) -> str:
        withs = ",\n".join(f"{n} AS ({b})" for n, b in self.ctes)
        return f"WITH {withs}\n{final}"


def _num(x: float) -> str:
    """A validated finite number as SQL text (only rule-file numbers, already checked by pydantic)."""
    f = float(x)
    if not math.isfinite(f):
        raise ValueError(f"non-finite number {x!r} in a rule")
    return repr(f) + "::DOUBLE"


def _int(x: int) -> str:
    return str(int(x))


# ------------------------------------------------------------------------------------------
# selectors -> base series (run, layer, at_layer, step, tokens, value, since)


def _base(q: _Query, sel: Selector, lookback: int) -> str:
    lb = _int(lookback)
    metric = q.p(sel.metric)
    if not sel.is_layer:
        return q.cte(
            f"SELECT s.run, NULL::INTEGER AS layer, NULL::INTEGER AS at_layer, s.step, max(s.tokens) AS tokens, "
            f"arg_max(s.value, s.attempt) AS value, any_value(cur.since) AS since "
            f"FROM {q.sources.scalars} s JOIN {q.cur} cur ON s.run = cur.run "
            f"WHERE s.name = {metric} AND s.step > cur.since - {lb} GROUP BY s.run, s.step"
        )
    conds = [f"l.metric = {metric}", f"l.step > cur.since - {lb}"]
    if sel.layer_type:
        conds.append(f"list_contains({q.p(list(sel.layer_type))}::VARCHAR[], l.layer_type)")
    join_stack = ""
    layers = sel.layers
    if layers is not None and layers.indices:
        conds.append(f"list_contains({q.p(list(layers.indices))}::INTEGER[], l.layer)")
    elif layers is not None and layers.named and layers.named != "all":
        # The stack: every non-MTP layer that logged any metric in the window (MaxVio exists only
        # on MoE layers, so "first quarter" must be counted on the whole stack, not on them).
        stack = q.cte(
            f"SELECT x.run, min(x.layer) AS lo, count(DISTINCT x.layer) AS n FROM {q.sources.layers} x "
            f"JOIN {q.cur} cur ON x.run = cur.run WHERE x.layer_type <> 'mtp' AND x.step > cur.since - {lb} GROUP BY x.run"
        )
        frac = {"first_quarter": 0.25, "first_half": 0.5, "last_half": 0.5, "last_quarter": 0.25}[layers.named]
        width = f"ceil(st.n * {frac})::INTEGER"
        join_stack = f"JOIN {stack} st ON l.run = st.run"
        conds.append("l.layer_type <> 'mtp'")
        if layers.named.startswith("first"):
            conds.append(f"l.layer < st.lo + {width}")
        else:
            conds.append(f"l.layer >= st.lo + st.n - {width}")
    rows = q.cte(
        f"SELECT l.run, l.layer, l.step, max(l.tokens) AS tokens, arg_max(l.value, l.attempt) AS value, "
        f"any_value(cur.since) AS since FROM {q.sources.layers} l JOIN {q.cur} cur ON l.run = cur.run {join_stack} "
        f"WHERE {' AND '.join(conds)} GROUP BY l.run, l.layer, l.step"
    )
    agg = sel.aggregate
    if agg is None:
        return q.cte(f"SELECT run, layer::INTEGER AS layer, layer::INTEGER AS at_layer, step, tokens, value, since FROM {rows}")
    value = {"max": "max(value)", "min": "min(value)", "median": "median(value)", "mean": "avg(value)"}[agg]
    at = {"max": "arg_max(layer, value)", "min": "arg_min(layer, value)"}.get(agg, "NULL")
    return q.cte(
        f"SELECT run, NULL::INTEGER AS layer, ({at})::INTEGER AS at_layer, step, max(tokens) AS tokens, "
        f"{value} AS value, any_value(since) AS since FROM {rows} GROUP BY run, step"
    )


# ------------------------------------------------------------------------------------------
# detectors -> observation CTEs (steps > since - extra)


def _threshold(q: _Query, d: Threshold, extra: int) -> str:
    b = _base(q, d, extra)
    conds = []
    if d.above is not None:
        conds.append(f"value > {q.p(float(d.above))}")
    if d.below is not None:
        conds.append(f"value < {q.p(float(d.below))}")
    return q.cte(
        f"SELECT run, layer, at_layer, step, tokens, value, "
        f"coalesce(NOT isnan(value) AND ({' OR '.join(conds)}), false) AS active, NULL::VARCHAR AS detail, since "
        f"FROM {b} WHERE step > since - {_int(extra)}"
    )


def _spike(q: _Query, d: Spike, extra: int) -> str:
    b = _base(q, d, extra + d.lookback())
    frame = f"PARTITION BY run, layer ORDER BY step RANGE BETWEEN {_int(d.window)} PRECEDING AND 1 PRECEDING"
    if d.method == "mad":
        centre, spread = "median(fv)", f"{MAD_TO_SIGMA} * mad(fv)"
    else:
        centre, spread = "avg(fv)", "stddev_samp(fv)"
    win = q.cte(
        f"SELECT *, {centre} OVER w AS centre, {spread} OVER w AS spread, count(fv) OVER w AS npts "
        f"FROM (SELECT *, CASE WHEN isfinite(value) THEN value END AS fv FROM {b}) WINDOW w AS ({frame})"
    )
    bound = (
        f"greatest({q.p(float(d.k))} * coalesce(spread, 0), {q.p(float(d.min_delta))}, "
        f"{q.p(float(d.min_rel))} * abs(centre))"
    )
    up, down = f"value > centre + {bound}", f"value < centre - {bound}"
    test = {"up": up, "down": down, "both": f"({up} OR {down})"}[d.direction]
    return q.cte(
        f"SELECT run, layer, at_layer, step, tokens, value, "
        f"coalesce(npts >= {_int(d.min_points)} AND NOT isnan(value) AND {test}, false) AS active, "
        f"printf('trailing %s %.4g, bound %.4g', {q.p('median' if d.method == 'mad' else 'mean')}, centre, "
        f"centre + {bound}) AS detail, since FROM {win} WHERE step > since - {_int(extra)}"
    )


def _trend(q: _Query, d: Trend, extra: int) -> str:
    b = _base(q, d, extra + d.lookback())
    s, w = d.smooth_steps, d.window
    # `smooth_by` picks each end's summary; the columns keep their names (`now_mean`) either way.
    # median() skips the NULLs non-finite values become, as avg() does.
    agg = "median" if d.smooth_by == "median" else "avg"
    win = q.cte(
        f"SELECT *, {agg}(fv) OVER (PARTITION BY run, layer ORDER BY step RANGE BETWEEN {_int(s - 1)} PRECEDING AND CURRENT ROW) AS now_mean, "
        f"{agg}(fv) OVER (PARTITION BY run, layer ORDER BY step RANGE BETWEEN {_int(w + s - 1)} PRECEDING AND {_int(w)} PRECEDING) AS then_mean "
        f"FROM (SELECT *, CASE WHEN isfinite(value) THEN value END AS fv FROM {b})"
    )
    rel = "(now_mean - then_mean) / abs(then_mean)"
    test = f"{rel} >= {q.p(float(d.rise))}" if d.rise > 0 else f"{rel} <= {q.p(float(d.rise))}"
    if d.min_value is not None:
        test += f" AND now_mean >= {q.p(float(d.min_value))}"
    return q.cte(
        f"SELECT run, layer, at_layer, step, tokens, "
        f"CASE WHEN then_mean IS NOT NULL AND then_mean <> 0 THEN {rel} END AS value, "
        f"coalesce(then_mean IS NOT NULL AND then_mean <> 0 AND {test}, false) AS active, "
        f"printf('{'median' if d.smooth_by == 'median' else 'mean'} %.4g now vs %.4g %d steps earlier', "
        f"now_mean, then_mean, {_int(w)}) AS detail, since "
        f"FROM {win} WHERE step > since - {_int(extra)}"
    )


def _nonfinite(q: _Query, d: NonFinite, extra: int) -> str:
    names = list(d.metrics) if d.metrics else None
    scalar_names = [m for m in names if not _is_layer(m)] if names else None
    layer_names = [m for m in names if _is_layer(m)] if names else None
    parts: list[str] = []
    lb = _int(extra)
    if scalar_names is None or scalar_names:
        cond = "" if scalar_names is None else f" AND list_contains({q.p(scalar_names)}::VARCHAR[], s.name)"
        parts.append(
            f"SELECT s.run, s.step, s.tokens, s.name AS sig, s.value, cur.since, 0 AS src FROM {q.sources.scalars} s "
            f"JOIN {q.cur} cur ON s.run = cur.run WHERE s.step > cur.since - {lb}{cond}"
        )
    if layer_names is None or layer_names:
        cond = "" if layer_names is None else f" AND list_contains({q.p(layer_names)}::VARCHAR[], l.metric)"
        parts.append(
            f"SELECT l.run, l.step, l.tokens, l.metric || '[' || l.layer || ']' AS sig, l.value, cur.since, 1 AS src "
            f"FROM {q.sources.layers} l JOIN {q.cur} cur ON l.run = cur.run WHERE l.step > cur.since - {lb}{cond}"
        )
    rows = q.cte(" UNION ALL ".join(parts))
    # Scalars and layer stats of one flush are separate segments: only judge steps both have reached.
    lim = q.cte(f"SELECT run, min(mx) AS upto FROM (SELECT run, src, max(step) AS mx FROM {rows} GROUP BY run, src) GROUP BY run")
    return q.cte(
        f"SELECT r.run, NULL::INTEGER AS layer, NULL::INTEGER AS at_layer, r.step, max(r.tokens) AS tokens, "
        f"count_if(NOT isfinite(r.value))::DOUBLE AS value, count_if(NOT isfinite(r.value)) > 0 AS active, "
        f"array_to_string(list_slice(list(r.sig || '=' || r.value::VARCHAR ORDER BY r.sig) "
        f"FILTER (WHERE NOT isfinite(r.value)), 1, 5), ', ') AS detail, any_value(r.since) AS since "
        f"FROM {rows} r JOIN {lim} m ON r.run = m.run WHERE r.step <= m.upto GROUP BY r.run, r.step"
    )


def _is_layer(name: str) -> bool:
    from healthwatch.alerts.rules import is_layer_metric

    return is_layer_metric(name)


def _collapse(q: _Query, obs: str) -> str:
    """Per-layer observations -> one per (run, step): active when any layer is."""
    return q.cte(
        f"SELECT run, step, max(tokens) AS tokens, bool_or(active) AS active, "
        f"coalesce(max(value) FILTER (WHERE active), max(value)) AS value, "
        f"coalesce(arg_max(at_layer, value) FILTER (WHERE active), any_value(at_layer)) AS at_layer, "
        f"coalesce(any_value(detail) FILTER (WHERE active), any_value(detail)) AS detail, any_value(since) AS since "
        f"FROM {obs} GROUP BY run, step"
    )


def _last_active(q: _Query, collapsed: str) -> str:
    return q.cte(
        f"SELECT run, step, max(CASE WHEN active THEN step END) OVER (PARTITION BY run ORDER BY step "
        f"ROWS UNBOUNDED PRECEDING) AS last_active FROM {collapsed}"
    )


def _upto(q: _Query, parts: list[str]) -> str:
    """Per run, the last step every part has observations for (parts without rows do not hold back)."""
    union = " UNION ALL ".join(f"SELECT run, max(step) AS mx FROM {p} GROUP BY run" for p in parts)
    return q.cte(f"SELECT run, min(mx) AS upto FROM ({union}) GROUP BY run")


def _all(q: _Query, d: All, extra: int) -> str:
    w = d.window
    parts = [_collapse(q, _compile(q, e, extra + w)) for e in d.of]
    las = [_last_active(q, p) for p in parts]
    upto = _upto(q, parts)
    grid = q.cte(
        " UNION ".join(f"SELECT run, step, since FROM {p}" for p in parts)
    )
    grid = q.cte(f"SELECT run, step, any_value(since) AS since FROM {grid} GROUP BY run, step")
    joins, checks = [], []
    for i, la in enumerate(las):
        joins.append(f"ASOF LEFT JOIN {la} a{i} ON g.run = a{i}.run AND g.step >= a{i}.step")
        checks.append(f"(a{i}.last_active IS NOT NULL AND a{i}.last_active > g.step - {_int(w)})")
    first = parts[0]
    return q.cte(
        f"SELECT g.run, NULL::INTEGER AS layer, f.at_layer, g.step, f.tokens, f.value, "
        f"coalesce({' AND '.join(checks)}, false) AS active, f.detail, g.since "
        f"FROM {grid} g {' '.join(joins)} "
        f"ASOF LEFT JOIN {first} f ON g.run = f.run AND g.step >= f.step "
        f"JOIN {upto} u ON g.run = u.run WHERE g.step <= u.upto AND g.step > g.since - {_int(extra)}"
    )


def _leads(q: _Query, d: Leads, extra: int) -> str:
    w = d.window
    lead = _collapse(q, _compile(q, d.leader, extra + w))
    foll = _collapse(q, _compile(q, d.follower, extra + w))
    la_l, la_f = _last_active(q, lead), _last_active(q, foll)
    upto = _upto(q, [lead, foll])
    return q.cte(
        f"SELECT g.run, NULL::INTEGER AS layer, g.at_layer, g.step, g.tokens, g.value, "
        f"coalesce(al.last_active > g.step - {_int(w)} AND af.step > g.step - {_int(w)} "
        f"AND (af.last_active IS NULL OR af.last_active <= g.step - {_int(w)}), false) AS active, "
        f"g.detail, g.since FROM {lead} g "
        f"ASOF LEFT JOIN {la_l} al ON g.run = al.run AND g.step >= al.step "
        f"ASOF LEFT JOIN {la_f} af ON g.run = af.run AND g.step >= af.step "
        f"JOIN {upto} u ON g.run = u.run WHERE g.step <= u.upto AND g.step > g.since - {_int(extra)}"
    )


def _sql(q: _Query, d: Sql, extra: int, columns: list[str]) -> str:
    lower = [c.lower() for c in columns]
    missing = [c for c in ("run", "step", "value") if c not in lower]
    if missing:
        raise ValueError(f"sql detector: the query must return columns run, step, value (missing {', '.join(missing)})")

    def col(name: str) -> str:
        return f'u."{columns[lower.index(name)]}"'

    conds = []
    if d.above is not None:
        conds.append(f"{col('value')}::DOUBLE > {q.p(float(d.above))}")
    if d.below is not None:
        conds.append(f"{col('value')}::DOUBLE < {q.p(float(d.below))}")
    test = " OR ".join(conds) if conds else f"{col('value')}::DOUBLE <> 0"
    layer = f"{col('layer')}::INTEGER" if "layer" in lower else "NULL::INTEGER"
    lb = _int(extra + d.lookback())
    query = d.query
    if q.on_snapshot:
        # The snapshot holds whatever window the widest rule needs; the query sees exactly what it
        # asked for (the evaluated runs from `lookback` steps before their cursor), so its answer
        # does not depend on which other rules share the evaluation. The CTEs shadow the view
        # names inside this subquery only (the other detectors of the statement read the full
        # snapshot tables).
        shadow = ", ".join(
            f"{view} AS (SELECT t.* FROM {Snapshot.TABLES[view]} t JOIN {q.cur} c ON t.run = c.run "
            f"WHERE t.step > c.since - {lb})" for view in Snapshot.TABLES)
        query = f"WITH {shadow} SELECT * FROM ({d.query}) AS uq"
    if "tokens" in lower:
        tokens, tjoin = f"{col('tokens')}::BIGINT", ""
    else:
        tok = q.cte(
            f"SELECT s.run, s.step, max(s.tokens) AS tokens FROM {q.sources.scalars} s JOIN {q.cur} cur ON s.run = cur.run "
            f"WHERE s.step > cur.since - {lb} GROUP BY s.run, s.step"
        )
        tokens, tjoin = "t.tokens", f"LEFT JOIN {tok} t ON t.run = {col('run')} AND t.step = {col('step')}"
    return q.cte(
        f"SELECT {col('run')}::VARCHAR AS run, {layer} AS layer, {layer} AS at_layer, {col('step')}::BIGINT AS step, "
        f"{tokens} AS tokens, {col('value')}::DOUBLE AS value, "
        f"coalesce(NOT isnan({col('value')}::DOUBLE) AND ({test}), false) AS active, "
        f"NULL::VARCHAR AS detail, cur.since FROM ({query}) u JOIN {q.cur} cur ON {col('run')} = cur.run {tjoin} "
        f"WHERE {col('step')} > cur.since - {_int(extra)}"
    )


def _compile(q: _Query, expr: Expr, extra: int) -> str:
    body = expr.body
    if isinstance(body, Threshold):
        return _threshold(q, body, extra)
    if isinstance(body, Spike):
        return _spike(q, body, extra)
    if isinstance(body, Trend):
        return _trend(q, body, extra)
    if isinstance(body, NonFinite):
        return _nonfinite(q, body, extra)
    if isinstance(body, All):
        return _all(q, body, extra)
    if isinstance(body, Leads):
        return _leads(q, body, extra)
    if isinstance(body, Sql):
        cols = q.sql_columns.get(body.query)
        if cols is None:
            raise RuntimeError("sql detector columns not probed")
        return _sql(q, body, extra, cols)
    raise ValueError(f"{expr.kind} detectors are not compiled to SQL")


def _sql_queries(expr: Expr) -> list[Sql]:
    body = expr.body
    if isinstance(body, Sql):
        return [body]
    if isinstance(body, All):
        return [s for e in body.of for s in _sql_queries(e)]
    if isinstance(body, Leads):
        return _sql_queries(body.leader) + _sql_queries(body.follower)
    return []


# ------------------------------------------------------------------------------------------
# public entry points


def _compile_into(q: _Query, expr: Expr) -> str:
    """Add ``expr``'s CTEs (cursor first) to ``q``; returns the name of its final CTE."""
    q.params[f"{q.prefix}runs"] = []
    q.params[f"{q.prefix}since"] = []
    q.ctes.append((q.cur, f"SELECT unnest(${q.prefix}runs::VARCHAR[]) AS run, unnest(${q.prefix}since::BIGINT[]) AS since"))
    return _compile(q, expr, 0)


def compile_expr(expr: Expr, sources: Sources | None = None, sql_columns: dict[str, list[str]] | None = None,
                 on_snapshot: bool = False) -> tuple[str, dict[str, Any]]:
    """The SQL text and named parameters of one detector (``$runs``/``$since`` are the cursor).

    ``on_snapshot``: compile for a :class:`Snapshot` rather than the store. Exposed for tests and
    debugging; :func:`evaluate` runs it.
    """
    q = _Query(sources or Sources(), sql_columns=sql_columns or {}, on_snapshot=on_snapshot)
    final = _compile_into(q, expr)
    # `ORDER BY` makes the state machine's input deterministic across evaluators.
    query = q.sql(f"SELECT run, layer, at_layer, step, tokens, value, active, detail FROM {final} "
                  "WHERE step > since ORDER BY run, layer NULLS FIRST, step")
    return query, q.params


def _probe_columns(run_sql: Callable[[str], Any], sql: Sql, where: str) -> list[str]:
    """Column names a ``sql`` detector's query returns where ``run_sql`` runs it (``where`` names it in errors)."""
    try:
        return list(run_sql(f"SELECT * FROM ({sql.query}) AS u LIMIT 0").arrow().schema.names)
    except Exception as exc:  # noqa: BLE001 - any DuckDB error is a rule error, said once
        raise ValueError(f"sql detector: the query does not run on {where}: {str(exc).splitlines()[0]}") from exc


#: Views a ``sql`` detector may read and still run on a :class:`Snapshot`.
SNAPSHOT_VIEWS = frozenset({"scalars_effective", "layer_stats_effective"})


@functools.lru_cache(maxsize=256)
def sql_on_snapshot(query: str) -> bool:
    """True when a ``sql`` detector's query reads only :data:`SNAPSHOT_VIEWS`, so it can run on the
    evaluation's snapshot over the window its ``lookback`` asks for.

    Any other query (one that reads ``runs``, ``events``, ``alerts``, a Parquet file, …, or that
    DuckDB cannot parse without binding) runs on the store, over its whole history, at every
    evaluation. (Run on the store, the default pack's MTP/train-loss ratio query recomputed its
    windows over every step of every run: ~30-60 s per evaluation at 1M steps.)
    """
    import duckdb

    try:
        tables = duckdb.get_table_names(query)
    except Exception:  # noqa: BLE001 - whatever DuckDB cannot resolve here, the store path judges
        return False
    return {t.lower() for t in tables} <= SNAPSHOT_VIEWS


def uses_store(expr: Expr) -> bool:
    """True when ``expr`` must run on the store itself (``gap``, and ``sql`` queries that read other
    views, see :func:`sql_on_snapshot`), False when a snapshot of the evaluated runs' recent rows is enough."""
    body = expr.body
    if isinstance(body, Gap):
        return True
    if isinstance(body, Sql):
        return not sql_on_snapshot(body.query)
    if isinstance(body, All):
        return any(uses_store(e) for e in body.of)
    if isinstance(body, Leads):
        return uses_store(body.leader) or uses_store(body.follower)
    return False


def expr_lookback(expr: Expr) -> int:
    """Steps of history before the cursor that ``expr`` reads (its windows, nested)."""
    return int(expr.body.lookback())


_EMPTY_SCALARS = pa.table({"run": pa.array([], pa.string()), "attempt": pa.array([], pa.int32()),
                           "step": pa.array([], pa.int64()), "tokens": pa.array([], pa.int64()),
                           "name": pa.array([], pa.string()), "value": pa.array([], pa.float64()),
                           "wall_time": pa.array([], pa.float64())})
_EMPTY_LAYERS = pa.table({"run": pa.array([], pa.string()), "attempt": pa.array([], pa.int32()),
                          "step": pa.array([], pa.int64()), "tokens": pa.array([], pa.int64()),
                          "layer": pa.array([], pa.int32()), "layer_type": pa.array([], pa.string()),
                          "metric": pa.array([], pa.string()), "value": pa.array([], pa.float64())})


class Snapshot:
    """The evaluated runs' recent rows, copied once per evaluation into an in-memory DuckDB.

    Every rule of an evaluation reads the same two small tables (named like the store's
    effective views, so the compiled SQL is the same) instead of scanning the Parquet segments
    and re-resolving superseded attempts once per rule: with a dozen rules this is most of the
    cost of an evaluation.
    """

    #: The store's view names -> the snapshot's own names for the same tables (a ``sql`` detector
    #: reads the latter through CTEs named like the former, bounded to its lookback).
    TABLES = {"scalars_effective": "hw_snapshot_scalars", "layer_stats_effective": "hw_snapshot_layer_stats"}

    def __init__(self) -> None:
        self.con = duck.cursor()
        self.rows = 0
        self._columns: dict[str, list[str]] = {}

    def load(self, store: Store, starts: dict[str, int], upto: int | None, sources: Sources) -> None:
        """Copy rows of ``starts``' runs with ``start < step (<= upto)`` from ``sources``."""
        # One query per run with constant bounds, so that DuckDB skips other runs' directories and
        # row groups outside the window by their statistics. (Bounds inside a join condition, or one
        # bound for all runs, scanned every row from the lowest start on: 11 s per evaluation with a
        # branch run 400k steps behind its parent at 1M steps x 108 layers.)
        scs, lss = [], []
        for run in sorted(starts):
            params: dict[str, Any] = {"run": run, "start": int(starts[run])}
            cond = "t.run = $run AND t.step > $start"
            if upto is not None:
                cond += " AND t.step <= $upto"
                params["upto"] = int(upto)
            scs.append(store.sql(
                f"SELECT t.run, t.attempt, t.step, t.tokens, t.name, t.value, t.wall_time "
                f"FROM {sources.scalars} t WHERE {cond}",
                params).arrow())
            lss.append(store.sql(
                f"SELECT t.run, t.attempt, t.step, t.tokens, t.layer, t.layer_type, t.metric, t.value "
                f"FROM {sources.layers} t WHERE {cond}", params).arrow())
        sc = pa.concat_tables(scs) if scs else _EMPTY_SCALARS
        ls = pa.concat_tables(lss) if lss else _EMPTY_LAYERS
        for name, table in (("scalars_effective", sc), ("layer_stats_effective", ls)):
            for alias in (name, self.TABLES[name]):
                self.con.unregister(alias)
                self.con.register(alias, table)
        self.rows = sc.num_rows + ls.num_rows

    def columns(self, sql: Sql) -> list[str]:
        """Column names a ``sql`` detector's query returns on the snapshot (probed once per query)."""
        cols = self._columns.get(sql.query)
        if cols is None:
            cols = self._columns[sql.query] = _probe_columns(self.con.sql, sql, "the evaluated runs' rows")
        return cols

    def sql(self, query: str, params: dict[str, Any]) -> Any:
        """Run a compiled detector query on the snapshot (same interface as ``Store.sql``)."""
        return self.con.sql(query, params=params)

    def close(self) -> None:
        """Drop the snapshot."""
        self.con.close()


def evaluate_many(snapshot: Snapshot, items: list[tuple[Expr, dict[str, int]]]) -> list[pl.DataFrame]:
    """Evaluate several snapshot detectors (each with its own cursors) in ONE DuckDB statement.

    Returns one observation frame per item, in order. Per-query overhead (planning, scheduling)
    dominates these small incremental windows, so one statement per evaluation instead of one
    per rule is most of the speed of an evaluation. Callers fall back to :func:`evaluate` per
    rule to isolate a failing one.
    """
    if not items:
        return []
    parts, params, ctes = [], {}, []
    for i, (expr, cursors) in enumerate(items):
        cols = {s.query: snapshot.columns(s) for s in _sql_queries(expr)}
        q = _Query(Sources(), prefix=f"r{i}_", sql_columns=cols, on_snapshot=True)
        final = _compile_into(q, expr)
        runs = sorted(cursors)
        q.params[f"r{i}_runs"] = runs
        q.params[f"r{i}_since"] = [int(cursors[r]) for r in runs]
        params.update(q.params)
        ctes.extend(q.ctes)
        parts.append(f"SELECT {i} AS rule, run, layer, at_layer, step, tokens, value, active, detail "
                     f"FROM {final} WHERE step > since")
    withs = ",\n".join(f"{n} AS ({b})" for n, b in ctes)
    query = f"WITH {withs}\n" + " UNION ALL ".join(f"({p})" for p in parts) + \
        " ORDER BY rule, run, layer NULLS FIRST, step"
    df = snapshot.sql(query, params).pl()
    if df.height == 0:
        return [empty_observations() for _ in items]
    rule = df["rule"].to_numpy()
    bounds = np.searchsorted(rule, np.arange(len(items) + 1), side="left")
    body = df.drop("rule").cast(OBS_SCHEMA)  # type: ignore[arg-type]
    return [body.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(len(items))]


def evaluate(
    store: Store,
    expr: Expr,
    cursors: dict[str, int],
    sources: Sources | None = None,
    snapshot: Snapshot | None = None,
) -> pl.DataFrame:
    """Observations of ``expr`` for the runs in ``cursors`` (run -> last evaluated step) after their cursor.

    With a ``snapshot`` (see :class:`Snapshot`) detectors that only read the evaluated runs run
    on it; ``gap``, and ``sql`` queries that read more than the effective views (see
    :func:`sql_on_snapshot`), always run on the store. Returns a frame with
    :data:`OBS_SCHEMA`, sorted by run, layer, step.
    """
    if not cursors:
        return empty_observations()
    if isinstance(expr.body, Gap):
        from healthwatch.alerts.gap import evaluate_gap

        return evaluate_gap(store, expr.body, cursors)
    on_snapshot = snapshot is not None and not uses_store(expr)
    if on_snapshot:
        assert snapshot is not None
        cols = {s.query: snapshot.columns(s) for s in _sql_queries(expr)}
    else:
        cols = {s.query: _probe_columns(store.sql, s, "this store") for s in _sql_queries(expr)}
    query, params = compile_expr(expr, None if on_snapshot else sources, cols, on_snapshot=on_snapshot)
    runs = sorted(cursors)
    params["runs"] = runs
    params["since"] = [int(cursors[r]) for r in runs]
    if on_snapshot:
        assert snapshot is not None
        df = snapshot.sql(query, params).pl()
    else:
        df = store.sql(query, params).pl()
    if df.height == 0:
        return empty_observations()
    return df.cast(OBS_SCHEMA)  # type: ignore[arg-type]
