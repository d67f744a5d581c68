"""Read functions for the signals beyond the report (docs/signals.md), for the app's Run page.

Part of the ``healthwatch.query`` package (the only reader). Every query is
parameterised and reads the ``*_effective`` views (superseded attempts hidden).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from healthwatch.query.grid import metric_names
from healthwatch.schema import SIGNAL_LAYER_METRICS
from healthwatch.store import Store
from healthwatch.store.reader import per_run

#: Signal families and their metrics, in the order the Run page shows them.
FAMILIES: dict[str, tuple[str, ...]] = {
    "NVFP4 quantisation": ("fp4_saturation", "fp4_rel_mse", "fp4_underflow", "fp4_amax",
                           "te_underflow", "te_mse", "te_amax"),
    "Optimizer updates": ("update_ratio", "update_norm"),
    "Router health": ("router_entropy", "router_zloss", "router_max_logit", "expert_bias_range", "token_drop_rate"),
    "Mamba health": ("ssm_decay_min", "ssm_decay_mean", "ssm_decay_max", "ssm_dt_mean", "ssm_dt_max", "ssm_dt_min"),
    "Attention health": ("attn_logit_max",),
}
assert all(m in SIGNAL_LAYER_METRICS for ms in FAMILIES.values() for m in ms)


@per_run
def signal_metrics(store: Store, run: str) -> list[str]:
    """The signal layer metrics (with operand suffixes) that ``run`` has rows of."""
    base = set(SIGNAL_LAYER_METRICS)
    return [m for m in metric_names(store, run) if m.split("/", 1)[0] in base]


@per_run
def worst_layers(store: Store, run: str, metric: str, k: int = 10, window: int = 100,
                 lowest: bool = False) -> pl.DataFrame:
    """Top-``k`` layers of ``metric`` at the run's newest step: ``layer, layer_type, step, value, before,
    rise`` with ``rise = (value - before) / |before|`` and ``before`` the layer's value ``window`` steps
    earlier (or its first, when younger). Ordered by value (descending; ascending with ``lowest``,
    for metrics where low is bad such as ``router_entropy`` or ``ssm_decay_min``)."""
    if k < 1 or window < 1:
        raise ValueError(f"k and window must be >= 1, got k={k}, window={window}")
    q = f"""
        WITH s AS (SELECT layer, layer_type, step, value FROM layer_stats_effective WHERE run = ? AND metric = ?),
        last AS (SELECT layer, max(step) AS step FROM s GROUP BY layer),
        now AS (SELECT s.layer, s.layer_type, s.step, s.value FROM s JOIN last USING (layer, step)),
        past AS (SELECT s.layer, arg_max(s.value, s.step) AS before FROM s JOIN last l ON s.layer = l.layer
                 WHERE s.step <= l.step - ? GROUP BY s.layer),
        first AS (SELECT layer, arg_min(value, step) AS first FROM s GROUP BY layer)
        SELECT now.layer, now.layer_type, now.step, now.value, coalesce(past.before, first.first) AS before
        FROM now LEFT JOIN past USING (layer) LEFT JOIN first USING (layer)
        ORDER BY now.value {'ASC' if lowest else 'DESC'} NULLS LAST, now.layer LIMIT ?"""
    df = store.sql(q, [run, metric, int(window), int(k)]).pl()
    if df.height == 0:
        return pl.DataFrame(schema={"layer": pl.Int32, "layer_type": pl.Utf8, "step": pl.Int64, "value": pl.Float64,
                                    "before": pl.Float64, "rise": pl.Float64})
    return df.with_columns(
        pl.when(pl.col("before").abs() > 0).then((pl.col("value") - pl.col("before")) / pl.col("before").abs())
        .otherwise(None).alias("rise"))


@per_run
def expert_load_matrix(store: Store, run: str, step: int) -> tuple[list[int], int | None, np.ndarray]:
    """Expert x layer load at the newest sample at or before ``step``: ``(layers, sample step, [layers, E])``.

    Rows are the MoE layers sampled at that step (``expert_load``), columns the experts (layers with
    fewer experts padded with NaN), values the share of the layer's assignments (rows sum to 1).
    """
    at = store.sql("SELECT max(step) FROM expert_load_effective WHERE run = ? AND step <= ?", [run, int(step)]).fetchone()
    if not at or at[0] is None:
        return [], None, np.zeros((0, 0))
    rows = store.sql("SELECT layer, counts FROM expert_load_effective WHERE run = ? AND step = ? ORDER BY layer",
                     [run, int(at[0])]).fetchall()
    width = max((len(c) for _l, c in rows), default=0)
    mat = np.full((len(rows), width), np.nan)
    for i, (_layer, counts) in enumerate(rows):
        c = np.asarray(counts, dtype=np.float64)
        mat[i, : len(c)] = c / c.sum() if c.sum() > 0 else c
    return [int(layer) for layer, _c in rows], int(at[0]), mat
