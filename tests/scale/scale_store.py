"""Hand-made stores for the scale-out tests: an NVFP4 parent with a rollback and two BF16 branches.

Values are functions of (step, layer) and tokens, so every expected number is computed from the
inputs here, never read back from the store under test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from healthwatch.schema import TABLES
from healthwatch.store import StoreWriter

LAYERS = 6
TOKENS_PER_STEP = 1000
STEP_EVERY = 10
PARENT = "ultra-nvfp4"
BRANCHES = {"bf16-at-2k": 2000, "bf16-at-6k": 6000}
ROLLBACK_AT = 5000  # attempt 2 of the parent restarts here; attempt 1's rows from 5000 on are superseded


def maxvio(steps: np.ndarray, layer: int, attempt: int) -> np.ndarray:
    """MaxVio of one layer; attempt 1 diverges (large values) where it will be superseded."""
    rng = np.random.default_rng(1000 * attempt + layer)
    v = 0.2 + 0.05 * layer + rng.gamma(2.0, 0.05, size=steps.size)
    if attempt == 1:
        v = np.where(steps >= ROLLBACK_AT, v + 5.0, v)
    return v


def loss(tokens: np.ndarray, bias: float) -> np.ndarray:
    """A loss-like curve of tokens; ``bias`` shifts a precision (NVFP4 a bit higher than BF16)."""
    return 2.0 + 1.5 * np.exp(-tokens / 4.0e6) + bias + 0.001 * np.sin(tokens / 7.3e4)


def _write_attempt(root: Path, run: str, attempt: int, steps: np.ndarray, *, precision: str, parent: str | None,
                   branch_step: int | None, loss_bias: float, chunks: int = 4) -> None:
    w = StoreWriter(root, run, attempt=attempt)
    now = time.time()
    w.write("runs", {"parent": [parent], "branch_step": [branch_step],
                     "branch_tokens": [None if branch_step is None else branch_step * TOKENS_PER_STEP],
                     "precision": [precision], "config": [json.dumps({"precision": precision})],
                     "created": [now + attempt * 1e-3], "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [attempt], "start_step": [int(steps[0])], "started_at": [now], "host": ["h"],
                         "reason": ["start" if attempt == 1 else "rollback"], "schema_version": ["1.0"]})
    for part in np.array_split(steps, chunks):  # several flushes: several segments per table
        tok = part * TOKENS_PER_STEP
        bias = loss_bias + (0.5 if attempt == 1 and run == PARENT else 0.0) * (part >= ROLLBACK_AT)
        w.write("scalars", pa.table({"attempt": np.full(part.size, attempt, np.int32), "step": part, "tokens": tok,
                                     "name": ["loss/train"] * part.size, "value": loss(tok.astype(float), 0) + bias,
                                     "wall_time": np.full(part.size, now)}, schema=TABLES["scalars"]))
        n = part.size * LAYERS
        w.write("layer_stats", pa.table({
            "attempt": np.full(n, attempt, np.int32), "step": np.repeat(part, LAYERS),
            "tokens": np.repeat(tok, LAYERS), "layer": np.tile(np.arange(LAYERS, dtype=np.int32), part.size),
            "layer_type": ["moe"] * n, "metric": ["maxvio"] * n,
            "value": np.stack([maxvio(part, layer, attempt) for layer in range(LAYERS)], axis=1).ravel(),
        }, schema=TABLES["layer_stats"]))


def write_lineage(root: Path, last_step: int = 9990) -> None:
    """The parent (attempt 1 to 5990, attempt 2 from 5000 to ``last_step``) and its two BF16 branches."""
    _write_attempt(root, PARENT, 1, np.arange(0, min(6000, last_step + 1), STEP_EVERY), precision="nvfp4",
                   parent=None, branch_step=None, loss_bias=0.01)
    if last_step >= ROLLBACK_AT:
        _write_attempt(root, PARENT, 2, np.arange(ROLLBACK_AT, last_step + 1, STEP_EVERY), precision="nvfp4",
                       parent=None, branch_step=None, loss_bias=0.01)
    for name, at in BRANCHES.items():
        if at > last_step:
            continue
        _write_attempt(root, name, 1, np.arange(at, last_step + 1, STEP_EVERY), precision="bf16", parent=PARENT,
                       branch_step=at, loss_bias=0.0)
