"""Divergence: signals normalised against a trailing window, the first mover, its lead over the
loss, and a rollback suggestion (the last checkpoint before the first mover).

Robust z-scores: ``(x - median) / (1.4826 * MAD)`` over the ``window`` buckets before each one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from healthwatch.query.runs import timeline
from healthwatch.query.series import _AGG_SQL, Signal
from healthwatch.store import Store
from healthwatch.store.reader import per_run


@dataclass(frozen=True)
class Crossing:
    """Where one signal first left its trailing band."""

    signal: str
    step: int
    tokens: int | None
    z: float
    direction: str  # "up" | "down"


@per_run
def bucket_means(store: Store, run: str, signals: Sequence[Signal], attempt: int | None,
                 lo: int, hi: int, buckets: int) -> pl.DataFrame:
    """Per-bucket means of ``signals`` on the path of ``attempt`` within ``[lo, hi]``, as
    ``(sig, step, tokens, value)`` with ``step`` the first step of the bucket (fixed width, so
    every signal shares the same time grid). Non-finite values propagate (a NaN bucket stays NaN)."""
    width = max(1, math.ceil((hi - lo + 1) / max(1, buckets)))
    path = timeline(store, run, attempt)
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


@per_run
def last_checkpoint_before(store: Store, run: str, attempt: int | None, step: int) -> dict[str, Any] | None:
    """The last checkpoint event on the path of ``attempt`` strictly before ``step``, or None."""
    params: list[Any] = [run, int(step)]
    pred = timeline(store, run, attempt).predicate(params)
    row = store.sql(f"SELECT step, tokens, attempt, message FROM events WHERE run = ? AND kind = 'checkpoint' "
                    f"AND step < ?{pred} ORDER BY step DESC LIMIT 1", params).fetchone()
    if row is None:
        return None
    return {"step": int(row[0]), "tokens": row[1], "attempt": row[2], "message": row[3]}


@per_run
def path_span(store: Store, run: str, attempt: int | None) -> tuple[int, int] | None:
    """First and last scalar step on the path of ``attempt``."""
    params: list[Any] = [run]
    pred = timeline(store, run, attempt).predicate(params)
    row = store.sql(f"SELECT min(step), max(step) FROM scalars WHERE run = ?{pred}", params).fetchone()
    return None if row is None or row[0] is None else (int(row[0]), int(row[1]))


def first_mover(crossings: Sequence[Crossing | None]) -> Crossing | None:
    """The earliest crossing (ties: the order given), or None when no signal left its band."""
    found = [c for c in crossings if c is not None]
    return min(found, key=lambda c: c.step) if found else None


@per_run
def rollback_suggestion(store: Store, run: str, attempt: int | None, first: Crossing | None) -> dict[str, Any] | None:
    """The checkpoint to roll back to: the last one on the path strictly before the first mover's step."""
    return None if first is None else last_checkpoint_before(store, run, attempt, first.step)


@per_run
def loss_band_exit(store: Store, run: str, attempt: int | None = None, onset: int | None = None,
                   name: str = "loss/train") -> Any:
    """Where ``run``'s loss on the path of ``attempt`` (None: effective) first leaves its trailing band
    (:func:`healthwatch.band.band_exit` on the path's raw rows), or None."""
    from healthwatch.band import band_exit

    params: list[Any] = [run, name]
    pred = timeline(store, run, attempt).predicate(params)
    rows = store.sql(f"SELECT step, tokens, value FROM scalars WHERE run = ? AND name = ?{pred} ORDER BY step",
                     params).fetchall()
    if not rows:
        return None
    steps, tokens, values = zip(*rows)
    return band_exit(list(steps), list(values), onset, tokens=list(tokens))
