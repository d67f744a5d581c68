"""One 100-step flush of a live writer, as the query tests write it (shared by several test files)."""

from __future__ import annotations

from typing import Any

import numpy as np


def write_flush(w: Any, attempt: int, steps: list[int], vals: np.ndarray) -> None:
    """Write ``vals`` (``[len(steps), layers]``) as ``resid_rms`` layer rows of ``steps`` and its first column as
    ``loss/train``, tokens = 7 x step (the tests' expected values come from ``vals``, not from the store)."""
    n, layers = vals.shape
    w.write("layer_stats", {
        "attempt": [attempt] * (n * layers), "step": [s for s in steps for _ in range(layers)],
        "tokens": [7 * s for s in steps for _ in range(layers)],
        "layer": [lay for _ in steps for lay in range(layers)], "layer_type": ["moe"] * (n * layers),
        "metric": ["resid_rms"] * (n * layers), "value": vals.reshape(-1).tolist()})
    w.write("scalars", {"attempt": [attempt] * n, "step": steps, "tokens": [7 * s for s in steps],
                        "name": ["loss/train"] * n, "value": vals[:, 0].tolist(), "wall_time": [0.0] * n})
