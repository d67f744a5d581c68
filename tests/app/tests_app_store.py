"""Writes small real stores for the app tests (all signal families, attempts, branches, alerts).

The main run diverges in its first attempt with a known anatomy (early-layer residual norm
rises at step 110, the 2nd MTP head at 120, the train loss at 150), is rolled back to the
checkpoint at step 100 and trains on healthily in attempt 2, so the Divergence page has a right
answer to find.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from healthwatch.store import StoreWriter

TOKENS_PER_STEP = 512
ONSET = {"resid_rms": 110, "loss/mtp_2": 120, "loss/train": 150}


def _ramp(s: np.ndarray, start: int | None, rate: float) -> np.ndarray:
    """Zero before ``start``, then a quadratic rise (a divergence), ``rate`` per step²."""
    if start is None:
        return np.zeros(s.size)
    d = np.clip(s - start, 0, None).astype(np.float64)
    return rate * d * d


def write_run(root: Path, run: str, steps: range, attempt: int = 1, parent: str | None = None,
              branch_step: int | None = None, layers: int = 4, moe: bool = True, start: int | None = None,
              diverge: bool = False, seed: int = 0, checkpoint_every: int = 50) -> None:
    """Write a run's metadata and all signal families for ``steps`` (one attempt)."""
    rng = np.random.default_rng(seed + attempt)
    w = StoreWriter(root, run, attempt=attempt)
    now = time.time()
    w.write("runs", {"parent": [parent], "branch_step": [branch_step],
                     "branch_tokens": [None if branch_step is None else branch_step * TOKENS_PER_STEP],
                     "precision": ["bf16" if parent else "nvfp4"], "config": [json.dumps({"layers": layers})],
                     "created": [now], "schema_version": ["1.0"]})
    first = steps.start if start is None else start
    w.write("attempts", {"attempt": [attempt], "start_step": [first], "started_at": [now], "host": ["h"],
                         "reason": ["start" if attempt == 1 else "rollback"], "schema_version": ["1.0"]})
    s = np.array(list(steps), dtype=np.int64)
    n = s.size
    on = ONSET if diverge else {}

    def noise(scale: float) -> np.ndarray:
        return scale * rng.standard_normal(n)

    base = 5 - np.log1p(s) / 3
    vals = {
        "loss/train": base + noise(0.002) + _ramp(s, on.get("loss/train"), 1e-3),
        "loss/mtp_1": base + 0.1 + noise(0.002) + _ramp(s, on.get("loss/train"), 1e-3),
        "loss/mtp_2": base + 0.2 + noise(0.002) + _ramp(s, on.get("loss/mtp_2"), 1e-3),
        "grad_norm/total": 1 + noise(0.01) + _ramp(s, on.get("loss/train"), 1e-3),
        "grad_norm/output": 0.5 + noise(0.01),
        "lr": np.full(n, 1e-3),
    }
    names = list(vals)
    w.write("scalars", {"attempt": [attempt] * (n * len(names)), "step": np.tile(s, len(names)),
                        "tokens": np.tile(s * TOKENS_PER_STEP, len(names)), "name": np.repeat(names, n),
                        "value": np.concatenate([vals[k] for k in names]),
                        "wall_time": np.full(n * len(names), now)})
    rows: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
    for layer in range(layers):
        ltype = "moe" if moe and layer % 2 else "mamba"
        metrics = ["resid_rms", "resid_rms_max", "wgrad_norm"] + (["maxvio", "dead_experts"] if ltype == "moe" else [])
        for metric in metrics:
            v = 1.0 + layer * 0.1 + 0.001 * s + noise(0.002)
            if metric.startswith("resid_rms") and layer == 0:
                v = v + _ramp(s, on.get("resid_rms"), 2e-3)
            if metric == "dead_experts":
                v = np.zeros(n)
            rows["attempt"] += [attempt] * n
            rows["step"] += s.tolist()
            rows["tokens"] += (s * TOKENS_PER_STEP).tolist()
            rows["layer"] += [layer] * n
            rows["layer_type"] += [ltype] * n
            rows["metric"] += [metric] * n
            rows["value"] += v.tolist()
    w.write("layer_stats", rows)
    if moe:
        es = [x for x in s.tolist() if x % 50 == 0] or [int(s[0])]
        w.write("expert_load", {"attempt": [attempt] * (2 * len(es)), "step": es * 2,
                                "tokens": [x * TOKENS_PER_STEP for x in es] * 2,
                                "layer": [1] * len(es) + [3] * len(es),
                                "counts": [[5, 3, 0, 8]] * len(es) + [[4, 4, 4, 4]] * len(es)})
    ck = [x for x in s.tolist() if x % checkpoint_every == 0 and x > s[0]]
    kinds = (["rollback"] if attempt > 1 else []) + ["checkpoint"] * len(ck)
    at = ([first] if attempt > 1 else []) + ck
    if at:
        w.write("events", {"attempt": [attempt] * len(at), "step": at, "tokens": [x * TOKENS_PER_STEP for x in at],
                           "kind": kinds, "message": ["rolled back to step 100" if k == "rollback" else "saved"
                                                      for k in kinds], "wall_time": [now] * len(at)})


def write_alerts(root: Path, run: str, rows: list[tuple[str, str, int, int | None, float]]) -> None:
    """Alert transitions ``(alert, state, step, layer, value)`` of ``run`` as the evaluator writes them."""
    w = StoreWriter(root, run, attempt=0, rank=7)
    t0 = time.time()
    w.write("alerts", {
        "alert": [r[0] for r in rows], "group": ["test"] * len(rows), "state": [r[1] for r in rows],
        "severity": ["critical" if r[0] == "LossDivergence" else "warning" for r in rows],
        "step": [r[2] for r in rows], "tokens": [r[2] * TOKENS_PER_STEP for r in rows], "layer": [r[3] for r in rows],
        "value": [r[4] for r in rows], "labels": ["{}"] * len(rows),
        "annotations": [json.dumps({"summary": f"{r[0]} {r[1]} at step {r[2]}"}) for r in rows],
        "fingerprint": [f"{run}-{r[0]}-{r[3]}" for r in rows], "evaluator": ["test"] * len(rows),
        "wall_time": [t0 + i for i in range(len(rows))],
    })


def build_app_store(root: Path) -> Path:
    """The standard app test store: ``main`` (2 attempts, diverged then rolled back, MoE, alerts),
    its BF16 branch ``main-bf16``, a second root run ``dense`` without MoE layers, and ``fresh``,
    a run still in its first step."""
    write_run(root, "main", range(0, 200), diverge=True)
    write_run(root, "main", range(100, 300), attempt=2)
    write_run(root, "main-bf16", range(100, 160), parent="main", branch_step=100)
    write_run(root, "dense", range(0, 50), moe=False, seed=3)
    write_run(root, "fresh", range(0, 1), seed=4)
    write_alerts(root, "main", [("LossDivergence", "pending", 150, None, 4.2),
                                ("LossDivergence", "firing", 155, None, 4.9),
                                ("LossDivergence", "resolved", 160, None, 3.1),
                                ("MaxVioHigh", "firing", 250, 1, 12.0)])
    return root
