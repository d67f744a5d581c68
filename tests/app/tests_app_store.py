"""Writes small real stores for the app tests (all signal families, attempts, branches)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from healthwatch.store import StoreWriter


def write_run(root: Path, run: str, steps: range, attempt: int = 1, parent: str | None = None,
              branch_step: int | None = None, layers: int = 4, moe: bool = True, start: int | None = None) -> None:
    """Write a run's metadata and all signal families for ``steps``."""
    w = StoreWriter(root, run, attempt=attempt)
    now = time.time()
    w.write("runs", {"parent": [parent], "branch_step": [branch_step],
                     "branch_tokens": [None if branch_step is None else branch_step * 512],
                     "precision": ["bf16" if parent else "nvfp4"], "config": ["{}"], "created": [now],
                     "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [attempt], "start_step": [steps.start if start is None else start],
                         "started_at": [now], "host": ["h"], "reason": ["start" if attempt == 1 else "rollback"],
                         "schema_version": ["1.0"]})
    s = np.array(list(steps))
    n = s.size
    names = ["loss/train", "loss/mtp_1", "loss/mtp_2", "grad_norm/total", "lr"]
    vals = {"loss/train": 5 - np.log1p(s) / 3, "loss/mtp_1": 5.1 - np.log1p(s) / 3, "loss/mtp_2": 5.2 - np.log1p(s) / 3,
            "grad_norm/total": 1 + 0.1 * np.sin(s), "lr": np.full(n, 1e-3)}
    w.write("scalars", {"attempt": [attempt] * (n * len(names)), "step": np.tile(s, len(names)),
                        "tokens": np.tile(s * 512, len(names)), "name": np.repeat(names, n),
                        "value": np.concatenate([vals[k] for k in names]), "wall_time": np.full(n * len(names), now)})
    rows: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
    for layer in range(layers):
        ltype = "moe" if moe and layer % 2 else "mamba"
        metrics = ["resid_rms", "resid_rms_max", "wgrad_norm"] + (["maxvio", "dead_experts"] if ltype == "moe" else [])
        for metric in metrics:
            rows["attempt"] += [attempt] * n
            rows["step"] += s.tolist()
            rows["tokens"] += (s * 512).tolist()
            rows["layer"] += [layer] * n
            rows["layer_type"] += [ltype] * n
            rows["metric"] += [metric] * n
            rows["value"] += (1.0 + layer * 0.1 + 0.001 * s).tolist()
    w.write("layer_stats", rows)
    if moe:
        w.write("expert_load", {"attempt": [attempt] * 2, "step": [s[0]] * 2, "tokens": [s[0] * 512] * 2,
                                "layer": [1, 3], "counts": [[5, 3, 0, 8], [4, 4, 4, 4]]})
    w.write("events", {"attempt": [attempt], "step": [s[0]], "tokens": [s[0] * 512],
                       "kind": ["rollback" if attempt > 1 else "checkpoint"], "message": ["x"], "wall_time": [now]})
