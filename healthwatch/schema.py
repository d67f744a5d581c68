"""Table schemas of the store, the schema version, and validation of names that become paths.

Every table is a set of immutable Parquet segments under ``table=<t>/run=<r>/``. The ``run``
column is *not* stored inside the files: it comes from the hive partition in the path, so a
segment can never disagree with the directory it lives in.
"""

from __future__ import annotations

import re

import pyarrow as pa

#: Major.minor. Readers refuse a newer *major* version; a newer minor only adds columns/tables.
SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])

LAYER_TYPES = ("mamba", "attention", "moe", "mlp", "mtp")

#: Per-layer metrics of the signals beyond the core five (docs/signals.md). NVFP4 and TE metrics
#: may carry an operand suffix: ``fp4_underflow/act``, ``te_mse/weight``.
SIGNAL_LAYER_METRICS = (
    "fp4_underflow", "fp4_saturation", "fp4_rel_mse", "fp4_amax",
    "te_underflow", "te_mse", "te_amax",
    "update_norm", "update_ratio",
    "router_entropy", "router_zloss", "router_max_logit", "expert_bias_range", "token_drop_rate",
    "ssm_decay_min", "ssm_decay_mean", "ssm_decay_max", "ssm_dt_mean", "ssm_dt_max", "ssm_dt_min",
    "attn_logit_max",
)


def is_signal_layer_metric(name: str) -> bool:
    """True for a signal layer metric, with or without an operand suffix (``fp4_rel_mse/weight``)."""
    base = name.split("/", 1)[0]
    return base in SIGNAL_LAYER_METRICS and (base == name or base.startswith(("fp4_", "te_")))

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:/+-]{1,200}$")


class SchemaError(ValueError):
    """A store, table or name does not match what this version of healthwatch understands."""


class NewerSchemaError(SchemaError):
    """The store was written by a newer major schema version than this reader supports."""


def validate_run_name(run: str) -> str:
    """Return ``run`` if it is a safe run name, else raise ``ValueError`` saying why.

    Run names become directory names (``run=<name>``), so path separators, ``..``, NUL,
    whitespace and other characters that could escape or confuse the store layout are refused.
    """
    if not isinstance(run, str):
        raise ValueError(f"run name must be a string, got {type(run).__name__}")
    if _RUN_NAME.match(run) and ".." not in run:
        return run
    shown = run.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:80]
    raise ValueError(
        f"invalid run name {shown!r}: use 1-128 characters from letters, digits and '._+-', "
        "starting with a letter or digit, without '..' (names become directories in the store)"
    )


def validate_metric_name(name: str) -> str:
    """Return ``name`` if it is a valid scalar/metric name, else raise ``ValueError``.

    Metric names are data, not paths, but NUL, control characters and unbounded lengths would
    break readers and chart labels, so they are refused with the offending name shown.
    """
    if isinstance(name, str) and _METRIC_NAME.match(name) and ".." not in name:
        return name
    shown = str(name).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:80]
    raise ValueError(
        f"invalid metric name {shown!r}: use 1-200 characters from letters, digits and '_.:/+-'"
    )


_KEY = [("attempt", pa.int32()), ("step", pa.int64()), ("tokens", pa.int64())]

#: Arrow schema of each table as stored in segments (without the partition column ``run``).
TABLES: dict[str, pa.Schema] = {
    "runs": pa.schema(
        [
            ("parent", pa.string()),
            ("branch_step", pa.int64()),
            ("branch_tokens", pa.int64()),
            ("precision", pa.string()),
            ("config", pa.string()),
            ("created", pa.float64()),
            ("schema_version", pa.string()),
        ]
    ),
    "attempts": pa.schema(
        [
            ("attempt", pa.int32()),
            ("start_step", pa.int64()),
            ("started_at", pa.float64()),
            ("host", pa.string()),
            ("reason", pa.string()),
            ("schema_version", pa.string()),
        ]
    ),
    "scalars": pa.schema(_KEY + [("name", pa.string()), ("value", pa.float64()), ("wall_time", pa.float64())]),
    "layer_stats": pa.schema(
        _KEY
        + [
            ("layer", pa.int32()),
            ("layer_type", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
        ]
    ),
    "expert_load": pa.schema(
        _KEY + [("layer", pa.int32()), ("counts", pa.list_(pa.int64()))]
    ),
    "events": pa.schema(
        _KEY + [("kind", pa.string()), ("message", pa.string()), ("wall_time", pa.float64())]
    ),
    "alerts": pa.schema(
        [
            ("alert", pa.string()),
            ("group", pa.string()),
            ("state", pa.string()),
            ("severity", pa.string()),
            ("step", pa.int64()),
            ("tokens", pa.int64()),
            ("layer", pa.int32()),
            ("value", pa.float64()),
            ("labels", pa.string()),
            ("annotations", pa.string()),
            ("fingerprint", pa.string()),
            ("evaluator", pa.string()),
            ("wall_time", pa.float64()),
        ]
    ),
    # Rollups (healthwatch.store.rollup): per attempt and bucket of `bucket_size` steps,
    # min/max/mean/last of that attempt's rows; kept current by the writer.
    "layer_stats_rollup": pa.schema(
        [
            ("bucket_size", pa.int64()),
            ("bucket", pa.int64()),
            ("attempt", pa.int32()),
            ("layer", pa.int32()),
            ("layer_type", pa.string()),
            ("metric", pa.string()),
            ("step_min", pa.int64()),
            ("step_max", pa.int64()),
            ("tokens_min", pa.int64()),
            ("tokens_max", pa.int64()),
            ("n", pa.int64()),
            ("vmin", pa.float64()),
            ("vmax", pa.float64()),
            ("vmean", pa.float64()),
            ("vlast", pa.float64()),
            ("step_vmin", pa.int64()),
            ("tokens_vmin", pa.int64()),
            ("step_vmax", pa.int64()),
            ("tokens_vmax", pa.int64()),
        ]
    ),
    "scalars_rollup": pa.schema(
        [
            ("bucket_size", pa.int64()),
            ("bucket", pa.int64()),
            ("attempt", pa.int32()),
            ("name", pa.string()),
            ("step_min", pa.int64()),
            ("step_max", pa.int64()),
            ("tokens_min", pa.int64()),
            ("tokens_max", pa.int64()),
            ("n", pa.int64()),
            ("vmin", pa.float64()),
            ("vmax", pa.float64()),
            ("vmean", pa.float64()),
            ("vlast", pa.float64()),
            ("step_vmin", pa.int64()),
            ("tokens_vmin", pa.int64()),
            ("step_vmax", pa.int64()),
            ("tokens_vmax", pa.int64()),
        ]
    ),
}

#: Tables whose rows belong to an attempt and are hidden by the ``*_effective`` views once superseded.
ATTEMPT_TABLES = ("scalars", "layer_stats", "expert_load", "events")

#: Sort order used by compaction, so that one series is a contiguous range of row groups.
SORT_KEYS: dict[str, list[str]] = {
    "scalars": ["name", "step", "attempt"],
    "layer_stats": ["metric", "layer", "step", "attempt"],
    "expert_load": ["layer", "step", "attempt"],
    "events": ["step", "attempt"],
    "alerts": ["wall_time"],
    "attempts": ["attempt"],
    "runs": ["created"],
    "layer_stats_rollup": ["bucket_size", "metric", "layer", "bucket", "attempt"],
    "scalars_rollup": ["bucket_size", "name", "bucket", "attempt"],
}


def check_schema_version(found: str | None, where: str) -> None:
    """Raise :class:`NewerSchemaError` when ``found`` has a newer major version than ours."""
    if not found:
        return
    try:
        major = int(str(found).split(".")[0])
    except ValueError as exc:
        raise SchemaError(f"{where}: unreadable schema version {found!r}") from exc
    if major > SCHEMA_MAJOR:
        raise NewerSchemaError(
            f"{where} was written with healthwatch schema {found}, newer than this reader's "
            f"{SCHEMA_VERSION}; upgrade healthwatch to read it"
        )
