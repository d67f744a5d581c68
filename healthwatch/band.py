"""The train loss's band and the step where it leaves it: the one definition of "the loss diverged".

Early warning is judged against a reference that does not move with the rules being judged
(DESIGN.md section 11): the **band exit** is the first step ``s >= onset`` whose loss is above the
median of the previous ``window`` (50) logged values plus ``k`` (4) robust standard deviations,
``1.4826 · MAD`` of those values, or is not finite::

    exit = min{ s >= onset : loss[s] > median(loss[s-50:s]) + 4 · 1.4826 · MAD(loss[s-50:s]) }

The window is the previous ``window`` *logged points* (one per step when the loss is logged every
step), with non-finite values left out of the median and the MAD. A step is only judged once its
window holds ``min_points`` finite values (by default the whole window).

Used by the early-warning benchmark (``benchmarks/bench_early_warning.py``), ``healthwatch demo``
(the lead of the first alert) and the app's Divergence page, so that all three report leads
against the same step. Pure numpy; no store access.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BAND_K", "BAND_WINDOW", "MAD_TO_SIGMA", "BandExit", "band_exit", "band_limits"]

#: Trailing window of the band, in logged points.
BAND_WINDOW = 50
#: Width of the band in robust standard deviations.
BAND_K = 4.0
#: MAD of a normal distribution times this is its standard deviation.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class BandExit:
    """Where the loss left its band: the step, its tokens, the loss and the band it left."""

    step: int
    tokens: int | None
    value: float
    median: float
    mad: float
    upper: float

    @property
    def reason(self) -> str:
        """One line saying why this step counts."""
        if not np.isfinite(self.value):
            return "non-finite loss"
        return (f"loss {self.value:.4g} > median {self.median:.4g} + {BAND_K:g}·{MAD_TO_SIGMA}·MAD "
                f"({self.mad:.3g}) = {self.upper:.4g}")


def _as_array(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def band_limits(
    values: Sequence[float] | np.ndarray,
    *,
    window: int = BAND_WINDOW,
    k: float = BAND_K,
    min_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trailing ``(median, mad, upper)`` for every point of ``values`` (NaN where not judged yet).

    Point ``i`` is judged against ``values[i-window:i]`` (its predecessors only), once that window
    holds ``min_points`` finite values (default: ``window``).
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    need = window if min_points is None else int(min_points)
    if not 1 <= need <= window:
        raise ValueError(f"min_points must be in [1, window={window}], got {min_points}")
    v = _as_array("values", values)
    n = v.size
    med = np.full(n, np.nan)
    mad = np.full(n, np.nan)
    for i in range(n):
        w = v[max(0, i - window):i]
        w = w[np.isfinite(w)]
        if w.size < need:
            continue
        m = float(np.median(w))
        med[i] = m
        mad[i] = float(np.median(np.abs(w - m)))
    return med, mad, med + k * MAD_TO_SIGMA * mad


def band_exit(
    steps: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    onset: int | None = None,
    *,
    tokens: Sequence[int] | np.ndarray | None = None,
    window: int = BAND_WINDOW,
    k: float = BAND_K,
    min_points: int | None = None,
) -> BandExit | None:
    """The first step ``>= onset`` where the loss leaves its trailing band upwards, or None.

    ``steps`` and ``values`` (and ``tokens`` when given) are parallel arrays of one run's train
    loss, in any order (they are sorted by step). ``onset=None`` judges every step that has a full
    window. A non-finite loss at a judged step is an exit.
    """
    s = _as_array("steps", steps)
    v = _as_array("values", values)
    if s.size != v.size:
        raise ValueError(f"steps and values differ in length ({s.size} != {v.size})")
    tok = None if tokens is None else _as_array("tokens", tokens)
    if tok is not None and tok.size != s.size:
        raise ValueError(f"tokens and steps differ in length ({tok.size} != {s.size})")
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    tok = None if tok is None else tok[order]
    med, mad, upper = band_limits(v, window=window, k=k, min_points=min_points)
    start = -np.inf if onset is None else onset
    for i in range(v.size):
        if s[i] < start or not np.isfinite(med[i]):
            continue
        if not np.isfinite(v[i]) or v[i] > upper[i]:
            t = None if tok is None or not np.isfinite(tok[i]) else int(tok[i])
            return BandExit(int(s[i]), t, float(v[i]), float(med[i]), float(mad[i]), float(upper[i]))
    return None
