"""The only reader of a healthwatch store: named, parameterised queries over its views.

One job per module, from the ground up:

* :mod:`~healthwatch.query.timeline` — an attempt's path: which rows a later attempt supersedes
  (also generates the store's ``*_effective``/``*_all`` views and the alert engine's sources);
* :mod:`~healthwatch.query.runs` — the run list, one run's status (finished / live / idle),
  lineage, attempts, events, markers, alert history, cheap cache signatures;
* :mod:`~healthwatch.query.rollups` — where a rollup may stand in for raw rows (one rule);
* :mod:`~healthwatch.query.series` — min/max-downsampled line series (and the incremental cache);
* :mod:`~healthwatch.query.grid` — heatmaps, per-layer profiles, expert load, name lists;
* :mod:`~healthwatch.query.divergence` — robust z-scores, first mover, lead, rollback suggestion;
* :mod:`~healthwatch.query.signals` — signal families: metrics of a run, worst layers, expert x layer load.

The app, the alert engine, the CLI, the comparison code and the benchmarks all call these.
"""

from healthwatch.query.divergence import (
    Crossing,
    bucket_means,
    first_crossing,
    first_mover,
    last_checkpoint_before,
    loss_band_exit,
    path_span,
    rollback_suggestion,
    trailing_z,
)
from healthwatch.query.grid import (
    expert_load_at,
    expert_load_steps,
    heatmap,
    layer_info,
    layer_metrics,
    layer_profile,
    layer_profiles,
    metric_names,
    profile_steps,
    scalar_names,
)
from healthwatch.query.rollups import RollupPlan, display_width, plan
from healthwatch.query.runs import (
    LIVE_S,
    alert_transitions,
    attempts,
    events,
    finished,
    lineage,
    markers,
    path_for,
    run_names,
    run_overview,
    run_signature,
    runs_overview,
    status,
    store_signature,
    timeline,
    tree_order,
)
from healthwatch.query.series import (
    MAX_POINTS,
    WIDTHS,
    Agg,
    SeriesCache,
    Signal,
    layer_aggregate,
    series,
    series_many,
)
from healthwatch.query.signals import expert_load_matrix, signal_metrics, worst_layers
from healthwatch.query.timeline import Timeline

__all__ = [
    "LIVE_S", "MAX_POINTS", "WIDTHS", "Agg", "Crossing", "RollupPlan", "SeriesCache", "Signal", "Timeline",
    "alert_transitions", "attempts", "bucket_means", "display_width", "events", "expert_load_at",
    "expert_load_steps", "finished", "first_crossing", "first_mover", "heatmap", "last_checkpoint_before",
    "layer_aggregate", "layer_info", "loss_band_exit", "layer_metrics", "layer_profile", "layer_profiles", "lineage", "markers", "metric_names",
    "path_for", "path_span", "plan", "profile_steps", "rollback_suggestion", "run_names", "run_overview",
    "run_signature", "runs_overview", "scalar_names", "series", "series_many", "signal_metrics", "status", "store_signature",
    "timeline", "trailing_z", "tree_order", "expert_load_matrix", "worst_layers",
]
