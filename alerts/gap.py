"""The precision-gap detector: relative train-loss gap of a branch run vs its parent, on tokens.

The gap itself is computed in exactly one place, :func:`healthwatch.compare.relative_gap` (DuckDB
ASOF joins on consumed tokens, linear interpolation of the reference), shared with the app's
Compare page and ``healthwatch compare``; it is re-exported here as :func:`relative_gap` so alert
code and the branch-comparison work read the same numbers.

This module adds what the alert engine needs on top: which pair a run belongs to (a branch and
its parent, oriented by precision), incremental evaluation (only the branch's new steps, with the
smoothing window read back), and mapping gap points to the *branch* run's steps.
"""

from __future__ import annotations

import polars as pl

from healthwatch.alerts.detectors import NEVER, OBS_SCHEMA, empty_observations
from healthwatch.alerts.rules import Gap
from healthwatch.compare import CompareError, orient, relative_gap
from healthwatch.store import Store

__all__ = ["branch_pairs", "evaluate_gap", "relative_gap"]


def branch_pairs(store: Store, runs: list[str] | None = None) -> list[tuple[str, str, str]]:
    """``(branch, low_run, ref_run)`` for every run with a parent (restricted to ``runs`` if given)."""
    rows = store.sql(
        "SELECT c.run, c.parent, c.precision, p.precision FROM runs c JOIN runs p ON p.run = c.parent"
    ).fetchall()
    out = []
    for child, parent, cprec, pprec in rows:
        if runs is not None and child not in runs:
            continue
        low, ref = orient(parent, child, pprec, cprec)
        out.append((child, low, ref))
    return out


def _window_start(store: Store, branch: str, low: str, metric: str, since: int, points: int) -> int | None:
    """Low-run tokens from which ``points`` smoothing points before the branch's step ``since`` exist."""
    if since <= NEVER:
        return None
    row = store.sql(
        "SELECT max(tokens) FROM scalars_effective WHERE run = ? AND name = ? AND step <= ?",
        [branch, metric, int(since)],
    ).fetchone()
    if row is None or row[0] is None:
        return None
    row = store.sql(
        "SELECT min(tokens) FROM (SELECT tokens FROM scalars_effective WHERE run = ? AND name = ? AND tokens <= ? "
        "ORDER BY tokens DESC LIMIT ?)",
        [low, metric, int(row[0]), int(points) + 1],
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def evaluate_gap(store: Store, d: Gap, cursors: dict[str, int]) -> pl.DataFrame:
    """Observations of a ``gap`` detector for the branch runs among ``cursors`` (steps > cursor)."""
    frames: list[pl.DataFrame] = []
    for branch, low, ref in branch_pairs(store, sorted(cursors)):
        since = int(cursors[branch])
        tmin = _window_start(store, branch, low, d.metric, since, d.smooth)
        try:
            gap = relative_gap(
                store, low, ref, d.metric, smooth="window" if d.smooth > 1 else None, span=d.smooth,
                unit="points", method=d.method, token_min=tmin,
            )
        except CompareError:
            continue  # a branch with no values yet, or no overlap yet: nothing to judge
        if gap.height == 0:
            continue
        # Each gap point belongs to the first branch step that made it comparable (at or after its
        # tokens), so a point that lands between two evaluations is never skipped.
        steps = store.sql(
            "SELECT tokens, max(step) AS bstep FROM scalars_effective WHERE run = ? AND name = ? AND tokens >= ? "
            "GROUP BY tokens ORDER BY tokens",
            [branch, d.metric, int(gap["tokens"].min())],
        ).pl()
        if steps.height == 0:
            continue
        steps = steps.cast({"tokens": pl.Int64, "bstep": pl.Int64})
        joined = gap.sort("tokens").join_asof(steps.sort("tokens"), on="tokens", strategy="forward")
        val = pl.col("gap_smooth")
        if d.absolute:
            val = val.abs()
        obs = (
            joined.filter(pl.col("bstep").is_not_null() & (pl.col("bstep") > since))
            .group_by("bstep")
            .agg(pl.all().sort_by("tokens").last())
            .select(
                pl.lit(branch).alias("run"),
                pl.lit(None, dtype=pl.Int32).alias("layer"),
                pl.lit(None, dtype=pl.Int32).alias("at_layer"),
                pl.col("bstep").alias("step"),
                pl.col("tokens"),
                val.alias("value"),
                (val.is_not_nan() & (val > float(d.above))).fill_null(False).alias("active"),
                pl.format("{} vs {}: gap {}", pl.lit(low), pl.lit(ref), pl.col("gap_smooth").round(5)).alias("detail"),
            )
        )
        frames.append(obs)
    if not frames:
        return empty_observations()
    return pl.concat(frames).cast(OBS_SCHEMA).sort(["run", "step"])  # type: ignore[arg-type]
