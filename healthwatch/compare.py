"""Token-aligned comparison of runs and the relative precision gap between them.

Runs of an ablation (an NVFP4 run and the BF16 branches cut from its checkpoints) log at
different steps, with different tokens per step and different logging intervals, so they are
compared on **consumed tokens**, never on steps. For every logged point of the low-precision run
the reference run's value is linearly interpolated at the same token count (two DuckDB ``ASOF``
joins find the reference rows just before and just after), restricted to the token span both runs
cover. The relative gap is ``(L_low - L_ref) / L_ref``: positive when the low-precision run is worse.

Rows of attempts superseded by a rollback are never compared (``scalars_effective``).

This module is the one implementation of the gap: the app's Compare page, ``healthwatch compare``
and the alert engine's ``gap`` detector all call :func:`relative_gap`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from healthwatch import query
from healthwatch.store import Store

if TYPE_CHECKING:  # plotly is imported lazily: the alert daemon needs the numbers, not the charts
    import plotly.graph_objects as go

Smooth = Literal["ema", "window"] | None
Unit = Literal["points", "tokens", "steps"]
Method = Literal["interpolate", "asof"]

#: Alert bands of the reference report: a gap above 0.4 % is a warning, above 1 % critical.
GAP_WARN = 0.004
GAP_CRIT = 0.01

#: Columns of :func:`relative_gap` (and of each pair in :func:`comparison_table`).
GAP_SCHEMA: dict[str, Any] = {
    "tokens": pl.Int64,
    "step_low": pl.Int64,
    "step_ref": pl.Int64,
    "low": pl.Float64,
    "ref": pl.Float64,
    "gap": pl.Float64,
    "gap_smooth": pl.Float64,
}

#: Columns of :func:`gap_summary`.
SUMMARY_SCHEMA: dict[str, Any] = {
    "parent": pl.Utf8,
    "branch": pl.Utf8,
    "low_run": pl.Utf8,
    "ref_run": pl.Utf8,
    "precision_low": pl.Utf8,
    "precision_ref": pl.Utf8,
    "branch_step": pl.Int64,
    "branch_tokens": pl.Int64,
    "tokens_from": pl.Int64,
    "tokens_to": pl.Int64,
    "tokens_compared": pl.Int64,
    "points": pl.Int64,
    "mean_gap": pl.Float64,
    "last_gap": pl.Float64,
    "max_gap": pl.Float64,
    "message": pl.Utf8,
}

# Bits per value, to tell which run of a pair is the low-precision one. Unknown names rank as None.
_PRECISION_BITS = {
    "fp64": 64, "float64": 64, "fp32": 32, "float32": 32, "tf32": 19, "bf16": 16, "bfloat16": 16,
    "fp16": 16, "float16": 16, "fp8": 8, "mxfp8": 8, "e4m3": 8, "e5m2": 8, "int8": 8,
    "nvfp4": 4, "mxfp4": 4, "fp4": 4, "int4": 4,
}


class CompareError(ValueError):
    """Base class of comparison errors; the message is meant for the user as it is."""


class MissingRunError(CompareError, LookupError):
    """A run (or its values of the compared metric) is not in the store."""


class NoOverlapError(CompareError):
    """Two runs share no token span, so there is nothing to compare."""


# --------------------------------------------------------------------------------------------
# small helpers


def format_tokens(n: float | None) -> str:
    """``5_000_000_000_000`` -> ``"5T"``, ``74_000_000_000`` -> ``"74B"``, ``2048`` -> ``"2.05k"``."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def precision_bits(precision: str | None) -> int | None:
    """Bits per value of a precision name (``"nvfp4"`` -> 4, ``"bf16"`` -> 16), None when unknown."""
    if not precision:
        return None
    return _PRECISION_BITS.get(precision.strip().lower())


def _runs_meta(store: Store) -> dict[str, dict[str, Any]]:
    rows = store.sql("SELECT run, parent, branch_step, branch_tokens, precision FROM runs").fetchall()
    return {
        r[0]: {"parent": r[1], "branch_step": r[2], "branch_tokens": r[3], "precision": r[4]} for r in rows
    }


def _effective(store: Store, run: str) -> tuple[str, list[Any]]:
    """SQL condition (and its parameters) that keeps only ``run``'s effective rows of ``scalars``.

    The path predicate of :func:`healthwatch.query.timeline` (the one rule of superseded rows) on
    the base table: DuckDB builds the ``*_effective`` views' hash join on the big side when its row
    estimate for filtered Parquet is low (~1 s per query at 1M steps, tens of ms this way).
    """
    params: list[Any] = []
    sql = query.timeline(store, run).predicate(params)
    return sql, params


def _token_span(store: Store, run: str, metric: str) -> tuple[int, int, int] | None:
    eff, eff_params = _effective(store, run)
    row = store.sql(
        f"SELECT min(tokens), max(tokens), count(*) FROM scalars WHERE run = ? AND name = ?{eff}",
        [run, metric, *eff_params],
    ).fetchone()
    if row is None or row[2] == 0:
        return None
    return int(row[0]), int(row[1]), int(row[2])


def _require_values(store: Store, run: str, metric: str, known: dict[str, dict[str, Any]] | None = None) -> tuple[int, int, int]:
    span = _token_span(store, run, metric)
    if span is not None:
        return span
    known = _runs_meta(store) if known is None else known
    if run not in known:
        names = ", ".join(sorted(known)[:20]) or "none"
        raise MissingRunError(f"run {run!r} is not in the store (runs: {names})")
    raise MissingRunError(f"run {run!r} has no {metric!r} values in the store")


# --------------------------------------------------------------------------------------------
# alignment and the gap

# One row per token count (the last logged step wins if a run logged the same tokens twice, e.g.
# tokens=0 while a dataloader warms up), so ASOF matches are unambiguous.
_ALIGN_SQL = """
WITH lo AS (
    SELECT tokens, max(step) AS step, arg_max(value, step) AS value
    FROM scalars WHERE run = ? AND name = ?{lo_eff}{lo_range} GROUP BY tokens
),
rf AS (
    SELECT tokens, max(step) AS step, arg_max(value, step) AS value
    FROM scalars WHERE run = ? AND name = ?{rf_eff} GROUP BY tokens
)
SELECT lo.tokens::BIGINT AS tokens, lo.step::BIGINT AS step_low, r0.step::BIGINT AS step_ref,
       lo.value AS low, {ref_expr} AS ref
FROM lo
ASOF JOIN rf r0 ON lo.tokens >= r0.tokens
ASOF JOIN rf r1 ON lo.tokens <= r1.tokens
ORDER BY lo.tokens
"""

# Linear interpolation between the reference rows at or before (r0) and at or after (r1).
_INTERP = (
    "CASE WHEN r1.tokens = r0.tokens THEN r0.value "
    "ELSE r0.value + (r1.value - r0.value) * ((lo.tokens - r0.tokens)::DOUBLE / (r1.tokens - r0.tokens)) END"
)


def align(
    store: Store,
    low_run: str,
    ref_run: str,
    metric: str = "loss/train",
    *,
    method: Method = "interpolate",
    token_min: int | None = None,
    token_max: int | None = None,
) -> pl.DataFrame:
    """The two runs' ``metric`` on the low run's tokens: ``(tokens, step_low, step_ref, low, ref)``.

    ``ref`` is the reference run's value linearly interpolated at ``tokens`` (``method="interpolate"``)
    or its last value at or before ``tokens`` (``method="asof"``). Only tokens inside the span both
    runs cover are returned (both ASOF joins must match), so the result may be empty.
    ``step_ref`` is the reference run's logged step at or before ``tokens``.
    """
    if method not in ("interpolate", "asof"):
        raise ValueError(f"method must be 'interpolate' or 'asof', got {method!r}")
    lo_eff, lo_eff_params = _effective(store, low_run)
    rf_eff, rf_eff_params = _effective(store, ref_run)
    params: list[Any] = [low_run, metric, *lo_eff_params]
    lo_range = ""
    if token_min is not None:
        lo_range += " AND tokens >= ?"
        params.append(int(token_min))
    if token_max is not None:
        lo_range += " AND tokens <= ?"
        params.append(int(token_max))
    params += [ref_run, metric, *rf_eff_params]
    query = _ALIGN_SQL.format(lo_eff=lo_eff, rf_eff=rf_eff, lo_range=lo_range,
                              ref_expr=_INTERP if method == "interpolate" else "r0.value")
    df = store.sql(query, params).pl()
    if df.height == 0:
        return pl.DataFrame(schema={k: v for k, v in GAP_SCHEMA.items() if k in ("tokens", "step_low", "step_ref", "low", "ref")})
    return df.cast({"tokens": pl.Int64, "step_low": pl.Int64, "step_ref": pl.Int64, "low": pl.Float64, "ref": pl.Float64})


def smooth_series(
    df: pl.DataFrame, column: str, smooth: Smooth, span: float, unit: Unit = "points", *, by: str | None = None
) -> pl.Series:
    """Smooth ``df[column]`` (sorted by ``by``): trailing EMA or trailing window.

    - ``unit="points"``: over logged rows; for EMA ``span`` follows the pandas convention
      (``alpha = 2 / (span + 1)``), for a window it is the number of rows.
    - ``unit="tokens"`` / ``"steps"``: over the ``by`` column (default ``tokens`` / ``step_low``), so
      irregular logging is weighted correctly; for EMA ``span`` is the half-life, for a window its
      length (rows with ``x > x_i - span``).

    Non-finite values are skipped (the smoothed value carries over them) so one NaN step does not
    poison the rest of the series; the raw column keeps them.
    """
    if smooth is None:
        return df[column].alias(f"{column}_smooth")
    if smooth not in ("ema", "window"):
        raise ValueError(f"smooth must be None, 'ema' or 'window', got {smooth!r}")
    if unit not in ("points", "tokens", "steps"):
        raise ValueError(f"unit must be 'points', 'tokens' or 'steps', got {unit!r}")
    if not span or span <= 0:
        raise ValueError(f"span must be positive, got {span!r}")
    if df.height == 0:
        return df[column].alias(f"{column}_smooth")
    col = pl.when(pl.col(column).is_finite()).then(pl.col(column)).otherwise(None)
    if unit == "points":
        if smooth == "ema":
            expr = col.ewm_mean(span=float(span), adjust=True, ignore_nulls=True)
        else:
            expr = col.rolling_mean(window_size=max(1, int(round(span))), min_samples=1)
    else:
        key = by or ("tokens" if unit == "tokens" else "step_low")
        width = f"{max(1, int(round(span)))}i"
        if smooth == "ema":
            expr = col.ewm_mean_by(pl.col(key), half_life=width)
        else:
            expr = col.rolling_mean_by(pl.col(key), window_size=width)
    return df.select(expr.forward_fill().alias(f"{column}_smooth")).to_series()


def relative_gap(
    store: Store,
    low_run: str,
    ref_run: str,
    metric: str = "loss/train",
    *,
    smooth: Smooth = None,
    span: float = 20,
    unit: Unit = "points",
    method: Method = "interpolate",
    token_min: int | None = None,
    token_max: int | None = None,
) -> pl.DataFrame:
    """Relative gap ``(L_low - L_ref) / L_ref`` of two runs aligned on consumed tokens.

    Args:
        store: an open store (:func:`healthwatch.open_store`).
        low_run: the low-precision run (e.g. the NVFP4 parent); evaluated at its own logged tokens.
        ref_run: the reference run (e.g. a BF16 branch); interpolated at ``low_run``'s tokens.
        metric: scalar name compared (``loss/train``, ``loss/mtp_2``, …).
        smooth: ``None``, ``"ema"`` or ``"window"`` (trailing); fills ``gap_smooth``.
        span: smoothing size, see :func:`smooth_series` (EMA span/half-life or window length).
        unit: ``"points"`` (logged rows), ``"tokens"`` or ``"steps"``: what ``span`` counts.
        method: ``"interpolate"`` (linear in tokens, default) or ``"asof"`` (last reference value
            at or before the tokens; biased by up to one reference logging interval).
        token_min, token_max: only compare the low run's points in this token range (inclusive).

    Returns:
        polars DataFrame sorted by tokens with columns ``tokens, step_low, step_ref, low, ref, gap,
        gap_smooth`` (``gap_smooth`` equals ``gap`` when ``smooth`` is None). Only the token span
        both runs cover appears. NaN/Inf losses are kept in ``gap``.

    Raises:
        MissingRunError (a ``LookupError``): a run is not in the store or never logged ``metric``.
        NoOverlapError (a ``ValueError``): the runs share no token span (message gives both spans).
    """
    known: dict[str, dict[str, Any]] | None = None
    low_span = _token_span(store, low_run, metric)
    ref_span = _token_span(store, ref_run, metric)
    if low_span is None or ref_span is None:
        known = _runs_meta(store)
        low_span = _require_values(store, low_run, metric, known)
        ref_span = _require_values(store, ref_run, metric, known)
    # Only the low run's points inside the reference's span can align: read no others.
    lo_min = ref_span[0] if token_min is None else max(int(token_min), ref_span[0])
    lo_max = ref_span[1] if token_max is None else min(int(token_max), ref_span[1])
    df = align(store, low_run, ref_run, metric, method=method, token_min=lo_min, token_max=lo_max)
    if df.height == 0:
        if token_min is not None or token_max is not None:
            # A window with nothing in it is a normal state for an incremental caller, not an error.
            return pl.DataFrame(schema=GAP_SCHEMA)
        raise NoOverlapError(
            f"runs {low_run!r} (tokens {format_tokens(low_span[0])}–{format_tokens(low_span[1])}) and "
            f"{ref_run!r} (tokens {format_tokens(ref_span[0])}–{format_tokens(ref_span[1])}) have no "
            f"overlapping tokens for {metric!r}: nothing to compare"
        )
    df = df.with_columns(((pl.col("low") - pl.col("ref")) / pl.col("ref")).alias("gap"))
    return df.with_columns(smooth_series(df, "gap", smooth, span, unit).alias("gap_smooth"))


def orient(parent: str, child: str, parent_precision: str | None, child_precision: str | None) -> tuple[str, str]:
    """``(low_run, ref_run)`` of a parent/branch pair.

    The parent is the low-precision run (an NVFP4 run with BF16 branches), unless the precisions
    say the branch is the lower one (e.g. an FP8 branch of a BF16 parent).
    """
    pb, cb = precision_bits(parent_precision), precision_bits(child_precision)
    if pb is not None and cb is not None and cb < pb:
        return child, parent
    return parent, child


def children(store: Store, parent: str) -> list[str]:
    """Direct branches of ``parent`` (runs whose ``parent`` is it), ordered by branch tokens/step."""
    rows = store.sql(
        "SELECT run FROM runs WHERE parent = ? ORDER BY branch_tokens NULLS LAST, branch_step NULLS LAST, run",
        [parent],
    ).fetchall()
    return [r[0] for r in rows]


def _summary_row(
    store: Store,
    parent: str | None,
    branch: str,
    low: str,
    ref: str,
    meta: dict[str, dict[str, Any]],
    metric: str,
    gap_kwargs: dict[str, Any],
    check_parent: bool,
) -> dict[str, Any]:
    info = meta.get(branch, {})
    row: dict[str, Any] = {k: None for k in SUMMARY_SCHEMA}
    row.update(
        parent=parent, branch=branch, low_run=low, ref_run=ref,
        precision_low=meta.get(low, {}).get("precision"), precision_ref=meta.get(ref, {}).get("precision"),
        branch_step=info.get("branch_step"), branch_tokens=info.get("branch_tokens"), points=0,
    )
    if check_parent and parent is not None and parent not in meta:
        row["message"] = f"parent {parent!r} of branch {branch!r} is missing from the store"
        return row
    try:
        df = relative_gap(store, low, ref, metric, **gap_kwargs)
    except CompareError as exc:
        row["message"] = str(exc)
        return row
    col = "gap_smooth" if gap_kwargs.get("smooth") else "gap"
    finite = df.filter(pl.col(col).is_finite())
    row.update(
        tokens_from=int(df["tokens"].min()), tokens_to=int(df["tokens"].max()),
        tokens_compared=int(df["tokens"].max() - df["tokens"].min()), points=df.height,
    )
    if finite.height:
        row.update(mean_gap=float(finite[col].mean()), last_gap=float(finite[col][-1]), max_gap=float(finite[col].max()))
    if finite.height < df.height:
        row["message"] = f"{df.height - finite.height} non-finite gap value(s) left out of mean/last/max"
    return row


def gap_summary(
    store: Store,
    parent: str | None = None,
    *,
    pairs: Iterable[tuple[str, str]] | None = None,
    branches: Iterable[str] | None = None,
    metric: str = "loss/train",
    smooth: Smooth = None,
    span: float = 20,
    unit: Unit = "points",
    method: Method = "interpolate",
) -> pl.DataFrame:
    """Gap summary per branch (the report's Figure 3): mean, last and max gap over each branch's span.

    With ``parent``, one row per direct branch of ``parent`` (each pair oriented by :func:`orient`:
    the NVFP4 parent is the low run, each BF16 branch the reference, over the branch's token span).
    ``branches`` restricts that to some of the branches. With ``pairs``, one row per
    ``(low_run, ref_run)``. Both may be given.

    Columns: see :data:`SUMMARY_SCHEMA`. ``mean_gap``/``last_gap``/``max_gap`` are fractions
    (0.004 = 0.4 %) of ``gap_smooth`` when ``smooth`` is given, else of the raw gap.
    ``tokens_compared`` is the token span compared. A row that cannot be computed (branch whose
    parent is missing, no overlapping tokens, run without the metric) has null statistics and a
    ``message`` saying why: this function does not raise for one bad branch.

    Raises:
        MissingRunError: ``parent`` is neither in the store nor named as the parent of any run.
    """
    if parent is None and pairs is None:
        raise ValueError("gap_summary needs a parent run or a list of (low_run, ref_run) pairs")
    meta = _runs_meta(store)
    gap_kwargs = {"smooth": smooth, "span": span, "unit": unit, "method": method}
    rows: list[dict[str, Any]] = []
    if parent is not None:
        kids = children(store, parent)
        if parent not in meta and not kids:
            names = ", ".join(sorted(meta)[:20]) or "none"
            raise MissingRunError(f"run {parent!r} is not in the store (runs: {names})")
        wanted = None if branches is None else set(branches)
        for kid in kids:
            if wanted is not None and kid not in wanted:
                continue
            low, ref = orient(parent, kid, meta.get(parent, {}).get("precision"), meta[kid]["precision"])
            rows.append(_summary_row(store, parent, kid, low, ref, meta, metric, gap_kwargs, True))
    for low, ref in pairs or ():
        # A free pair: the reference's recorded parent is shown, but need not be in the store.
        parent_of = meta.get(ref, {}).get("parent")
        rows.append(_summary_row(store, parent_of, ref, low, ref, meta, metric, gap_kwargs, False))
    return pl.DataFrame(rows, schema=SUMMARY_SCHEMA) if rows else pl.DataFrame(schema=SUMMARY_SCHEMA)


def resolve_pairs(store: Store, runs: Sequence[str]) -> list[tuple[str, str]]:
    """``(low_run, ref_run)`` pairs for a list of runs as the CLI takes them.

    One run: that run against each of its branches (oriented by :func:`orient`). Several: the
    first is the low-precision run, each of the others a reference.
    """
    runs = list(dict.fromkeys(runs))  # keep order, drop repeats
    if not runs:
        raise ValueError("give at least one run to compare")
    meta = _runs_meta(store)
    if len(runs) == 1:
        (run,) = runs
        kids = children(store, run)
        if not kids:
            if run not in meta:
                raise MissingRunError(f"run {run!r} is not in the store (runs: {', '.join(sorted(meta)[:20]) or 'none'})")
            raise ValueError(f"run {run!r} has no branches: name the runs to compare (--runs LOW REF …)")
        prec = meta.get(run, {}).get("precision")
        return [orient(run, k, prec, meta[k]["precision"]) for k in kids]
    return [(runs[0], r) for r in runs[1:]]


def comparison_table(
    store: Store,
    pairs: Sequence[tuple[str, str]],
    metric: str = "loss/train",
    **gap_kwargs: Any,
) -> pl.DataFrame:
    """:func:`relative_gap` of several pairs, stacked with ``low_run``/``ref_run`` columns first.

    Raises the first pair's :class:`CompareError` (callers that want per-pair messages use
    :func:`gap_summary` or call :func:`relative_gap` themselves).
    """
    frames = []
    for low, ref in pairs:
        df = relative_gap(store, low, ref, metric, **gap_kwargs)
        frames.append(df.select(pl.lit(low).alias("low_run"), pl.lit(ref).alias("ref_run"), pl.all()))
    if not frames:
        return pl.DataFrame(schema={"low_run": pl.Utf8, "ref_run": pl.Utf8, **GAP_SCHEMA})
    return pl.concat(frames)


# --------------------------------------------------------------------------------------------
# figures (shared by the app and the CLI export)


def _add_bands(fig: go.Figure, row: int | None = None, col: int | None = None) -> None:
    """Shaded ±0.4 % (warning) and ±1 % (critical) bands, in percent."""
    where: dict[str, Any] = {} if row is None else {"row": row, "col": col}
    for lim, color in ((GAP_CRIT * 100, "rgba(220,20,60,0.07)"), (GAP_WARN * 100, "rgba(255,165,0,0.12)")):
        fig.add_hrect(y0=-lim, y1=lim, fillcolor=color, line_width=0, layer="below", **where)
    for lim, color in ((GAP_WARN * 100, "orange"), (GAP_CRIT * 100, "crimson")):
        for sign in (1, -1):
            fig.add_hline(y=sign * lim, line={"color": color, "dash": "dot", "width": 1}, **where)


def gap_figure(table: pl.DataFrame, *, smoothed: bool = False, title: str = "Relative gap per branch") -> go.Figure:
    """Relative gap (%) over tokens, one trace per ``(low_run, ref_run)`` of a :func:`comparison_table`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    _gap_traces(fig, table, smoothed)
    _add_bands(fig)
    fig.update_layout(title=title, xaxis_title="tokens consumed", yaxis_title="gap (%)", height=360,
                      margin={"l": 60, "r": 20, "t": 40, "b": 45}, legend={"orientation": "h", "y": -0.25})
    return fig


def _gap_traces(fig: go.Figure, table: pl.DataFrame, smoothed: bool, row: int | None = None) -> None:
    import plotly.graph_objects as go

    where: dict[str, Any] = {} if row is None else {"row": row, "col": 1}
    for (low, ref), part in table.group_by(["low_run", "ref_run"], maintain_order=True):
        name = f"{low} vs {ref}"
        if smoothed:
            fig.add_trace(go.Scattergl(x=part["tokens"].to_list(), y=(part["gap"] * 100).to_list(), mode="lines",
                                       name=name + " (raw)", legendgroup=name, showlegend=False,
                                       line={"width": 1}, opacity=0.3), **where)
        col = "gap_smooth" if smoothed else "gap"
        fig.add_trace(go.Scattergl(x=part["tokens"].to_list(), y=(part[col] * 100).to_list(), mode="lines",
                                   name=name, legendgroup=name, line={"width": 1.8}), **where)


def loss_figure(frames: dict[str, pl.DataFrame], metric: str = "loss/train", title: str | None = None) -> go.Figure:
    """``metric`` of several runs on a tokens axis; ``frames`` maps run -> frame with ``tokens, value``."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for run, df in frames.items():
        if df.height:
            fig.add_trace(go.Scattergl(x=df["tokens"].to_list(), y=df["value"].to_list(), mode="lines", name=run))
    fig.update_layout(title=title or f"{metric} on tokens", xaxis_title="tokens consumed", yaxis_title=metric,
                      height=360, margin={"l": 60, "r": 20, "t": 40, "b": 45}, legend={"orientation": "h", "y": -0.25})
    return fig


def summary_figure(summary: pl.DataFrame, title: str = "Mean relative gap per branch") -> go.Figure:
    """Bar per branch of a :func:`gap_summary` (mean gap, %), last and max as markers, with the bands."""
    import plotly.graph_objects as go

    ok = summary.filter(pl.col("mean_gap").is_not_null())
    # One bar per branch, named by where it was cut from its parent, as in the report's Figure 3.
    labels = [
        f"{r['branch']}<br>@ {format_tokens(r['branch_tokens'])} tokens" if r["branch_tokens"] is not None
        else str(r["branch"])
        for r in ok.iter_rows(named=True)
    ]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=(ok["mean_gap"] * 100).to_list(), name="mean gap",
                         text=[f"{v * 100:.3f} %" for v in ok["mean_gap"]], textposition="outside"))
    fig.add_trace(go.Scatter(x=labels, y=(ok["last_gap"] * 100).to_list(), mode="markers", name="last",
                             marker={"symbol": "diamond", "size": 10}))
    fig.add_trace(go.Scatter(x=labels, y=(ok["max_gap"] * 100).to_list(), mode="markers", name="max",
                             marker={"symbol": "triangle-up", "size": 10}))
    for lim, color, text in ((GAP_WARN * 100, "orange", "0.4 %"), (GAP_CRIT * 100, "crimson", "1 %")):
        fig.add_hline(y=lim, line={"color": color, "dash": "dot", "width": 1}, annotation_text=text,
                      annotation_position="top right")
    fig.update_layout(title=title, yaxis_title="relative gap (%)", height=360,
                      margin={"l": 60, "r": 20, "t": 40, "b": 45}, legend={"orientation": "h", "y": -0.2})
    return fig


def comparison_figure(table: pl.DataFrame, metric: str = "loss/train", *, smoothed: bool = False) -> go.Figure:
    """Two stacked panels sharing the tokens axis: ``metric`` of every run, and the gap (%) with bands."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=(f"{metric} on tokens", "relative gap (L_low - L_ref) / L_ref"))
    seen: set[str] = set()
    for (low, ref), part in table.group_by(["low_run", "ref_run"], maintain_order=True):
        if low not in seen:
            seen.add(low)
            fig.add_trace(go.Scattergl(x=part["tokens"].to_list(), y=part["low"].to_list(), mode="lines",
                                       name=low, line={"width": 1.6}), row=1, col=1)
        # The reference as compared (interpolated at the low run's tokens), so panels agree exactly.
        fig.add_trace(go.Scattergl(x=part["tokens"].to_list(), y=part["ref"].to_list(), mode="lines",
                                   name=f"{ref} (at {low}'s tokens)", line={"width": 1.2}), row=1, col=1)
    _gap_traces(fig, table, smoothed, row=2)
    _add_bands(fig, row=2, col=1)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_yaxes(title_text="gap (%)", row=2, col=1)
    fig.update_xaxes(title_text="tokens consumed", row=2, col=1)
    fig.update_layout(height=640, margin={"l": 60, "r": 20, "t": 50, "b": 45}, legend={"orientation": "h", "y": -0.12})
    return fig


def kaleido_available() -> bool:
    """Whether static image export (PNG) is possible: plotly needs the optional ``kaleido`` package."""
    try:
        import kaleido  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no PNG"
        return False
    return True


def _require_kaleido() -> None:
    if not kaleido_available():
        raise CompareError("PNG export needs the optional 'kaleido' package (pip install kaleido); "
                           "export .html for an interactive chart instead")


def figure_png(fig: go.Figure) -> bytes:
    """PNG bytes of a figure; raises :class:`CompareError` with a clear message without kaleido."""
    _require_kaleido()
    try:
        return fig.to_image(format="png", width=1200, height=int(fig.layout.height or 640), scale=2)
    except Exception as exc:  # noqa: BLE001 - kaleido needs a browser it may not find
        raise CompareError(f"PNG export failed ({exc}); export .html instead") from exc


# --------------------------------------------------------------------------------------------
# export (the `healthwatch compare` command)

EXPORT_FORMATS = (".csv", ".parquet", ".html", ".png")


def export_comparison(
    store_root: str | os.PathLike[str],
    runs: list[str],
    out: str | os.PathLike[str],
    metric: str = "loss/train",
    *,
    smooth: Smooth = None,
    span: float = 20,
    unit: Unit = "points",
    method: Method = "interpolate",
) -> Path:
    """Write the token-aligned comparison of ``runs`` to ``out``; returns the path written.

    ``runs[0]`` is the low-precision run and every other run a reference; a single run is compared
    with each of its branches. The format follows ``out``'s suffix: ``.csv``/``.parquet`` (the
    stacked :func:`comparison_table`: ``low_run, ref_run, tokens, step_low, step_ref, low, ref,
    gap, gap_smooth``), ``.html`` (interactive :func:`comparison_figure`, plotly.js embedded so it
    opens offline) or ``.png`` (needs ``kaleido``).

    Raises:
        ValueError: unknown format, no runs, no overlapping tokens, PNG without kaleido.
        LookupError: no store at ``store_root``, or a run (or its ``metric``) is not in it.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ValueError(f"--out must end in {', '.join(EXPORT_FORMATS)} (got {out.name!r})")
    if suffix == ".png":
        _require_kaleido()  # say so before any work is done
    from healthwatch.store import fs as store_fs

    root = store_fs.root_path(store_root)  # a directory or s3://bucket/prefix
    if not store_fs.store_exists(root):
        raise LookupError(f"no healthwatch store at {root}")
    store = Store(root)
    try:
        pairs = resolve_pairs(store, runs)
        table = comparison_table(store, pairs, metric, smooth=smooth, span=span, unit=unit, method=method)
    finally:
        store.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        table.write_csv(out)
    elif suffix == ".parquet":
        table.write_parquet(out)
    else:
        fig = comparison_figure(table, metric, smoothed=smooth is not None)
        if suffix == ".html":
            fig.write_html(out, include_plotlyjs=True, full_html=True)
        else:
            out.write_bytes(figure_png(fig))
    return out
