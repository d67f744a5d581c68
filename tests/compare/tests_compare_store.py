"""Writes hand-made stores for the comparison tests: runs with known losses on a tokens axis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from healthwatch.store import StoreWriter


def curve(tokens: np.ndarray) -> np.ndarray:
    """A smooth, loss-like function of tokens (slow enough that linear interpolation is exact to 1e-7)."""
    return 2.0 + 1.5 * np.exp(-tokens / 2.0e7)


def write_run(
    root: Path,
    run: str,
    steps: np.ndarray | range,
    tokens_per_step: int,
    fn: Callable[[np.ndarray], np.ndarray] = curve,
    *,
    precision: str = "nvfp4",
    parent: str | None = None,
    branch_step: int | None = None,
    branch_tokens: int | None = None,
    token_offset: int = 0,
    step0: int = 0,
    attempt: int = 1,
    start_step: int | None = None,
    config: dict | None = None,
    extra: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    layers: int = 0,
) -> None:
    """Write one attempt of a run: ``loss/train = fn(tokens)`` at ``steps``,
    with ``tokens = token_offset + (step - step0) * tokens_per_step``."""
    s = np.asarray(list(steps), dtype=np.int64)
    tok = token_offset + (s - step0) * tokens_per_step
    w = StoreWriter(root, run, attempt=attempt)
    now = time.time()
    w.write("runs", {"parent": [parent], "branch_step": [branch_step], "branch_tokens": [branch_tokens],
                     "precision": [precision], "config": [json.dumps(config or {})], "created": [now + attempt * 1e-3],
                     "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [attempt], "start_step": [int(s[0]) if start_step is None else start_step],
                         "started_at": [now], "host": ["h"], "reason": ["start" if attempt == 1 else "rollback"],
                         "schema_version": ["1.0"]})
    series = {"loss/train": fn(tok.astype(np.float64))}
    for name, f in (extra or {}).items():
        series[name] = f(tok.astype(np.float64))
    n = s.size
    w.write("scalars", {"attempt": [attempt] * (n * len(series)), "step": np.tile(s, len(series)),
                        "tokens": np.tile(tok, len(series)), "name": np.repeat(list(series), n),
                        "value": np.concatenate(list(series.values())), "wall_time": np.full(n * len(series), now)})
    if layers:
        rows: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
        for layer in range(layers):
            ltype = "moe" if layer % 2 else "mamba"
            for metric in ["resid_rms", "wgrad_norm"] + (["maxvio"] if ltype == "moe" else []):
                rows["attempt"] += [attempt] * n
                rows["step"] += s.tolist()
                rows["tokens"] += tok.tolist()
                rows["layer"] += [layer] * n
                rows["layer_type"] += [ltype] * n
                rows["metric"] += [metric] * n
                rows["value"] += (1.0 + 0.1 * layer + tok / 1e8).tolist()
        w.write("layer_stats", rows)


def scaled(k: float) -> Callable[[np.ndarray], np.ndarray]:
    """``curve`` times ``k``: a run whose relative gap to ``curve`` is exactly ``k - 1``."""
    return lambda t: k * curve(t)
