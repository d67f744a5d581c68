"""Helpers for the alert tests: build real stores (Parquet segments via StoreWriter)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from healthwatch.schema import SCHEMA_VERSION
from healthwatch.store import StoreWriter

TOKENS_PER_STEP = 1000


def writer(root: Path, run: str, attempt: int = 1, parent: str | None = None, branch_step: int | None = None,
           precision: str = "bf16", start_step: int = 0) -> StoreWriter:
    """A writer for ``run`` with its runs/attempts rows written."""
    w = StoreWriter(root, run, attempt=attempt)
    w.write("runs", {"parent": [parent], "branch_step": [branch_step],
                     "branch_tokens": [None if branch_step is None else branch_step * TOKENS_PER_STEP],
                     "precision": [precision], "config": ["{}"], "created": [float(attempt)],
                     "schema_version": [SCHEMA_VERSION]})
    w.write("attempts", {"attempt": [attempt], "start_step": [start_step], "started_at": [float(attempt)],
                         "host": ["test"], "reason": ["start" if attempt == 1 else "rollback"],
                         "schema_version": [SCHEMA_VERSION]})
    return w


def scalars(w: StoreWriter, name: str, steps: Sequence[int], values: Sequence[float],
            tokens_per_step: int = TOKENS_PER_STEP) -> None:
    """Write one scalar series as one segment."""
    steps = list(steps)
    w.write("scalars", {"attempt": [w.attempt] * len(steps), "step": steps,
                        "tokens": [s * tokens_per_step for s in steps], "name": [name] * len(steps),
                        "value": [float(v) for v in values], "wall_time": [0.0] * len(steps)})


def layers(w: StoreWriter, metric: str, steps: Sequence[int], values_by_layer: dict[int, Sequence[float]],
           layer_type: str | dict[int, str] = "moe", tokens_per_step: int = TOKENS_PER_STEP) -> None:
    """Write a layer metric for several layers (``{layer: values}``) as one segment."""
    cols: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
    for layer, values in values_by_layer.items():
        lt = layer_type[layer] if isinstance(layer_type, dict) else layer_type
        for s, v in zip(steps, values):
            cols["attempt"].append(w.attempt)
            cols["step"].append(s)
            cols["tokens"].append(s * tokens_per_step)
            cols["layer"].append(layer)
            cols["layer_type"].append(lt)
            cols["metric"].append(metric)
            cols["value"].append(float(v))
    w.write("layer_stats", cols)


def rules_yaml(body: str) -> str:
    """A one-group rule file around ``body`` (the rules list, indented by 6 spaces)."""
    return "groups:\n  - name: t\n    rules:\n" + body


def states(transitions: Iterable) -> list[tuple[str, str, int]]:
    """``(alert, state, step)`` of transitions."""
    return [(t.alert, t.state, t.step) for t in transitions]
