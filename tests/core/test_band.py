"""healthwatch.band: the loss band exit, checked against a plain-Python computation of the definition."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthwatch.band import BAND_K, BAND_WINDOW, MAD_TO_SIGMA, band_exit, band_limits


def reference_exit(values: list[float], onset: int, window: int = 50, k: float = 4.0) -> int | None:
    """The definition written out: first step >= onset with loss > median + k*1.4826*MAD of the previous window."""
    for s in range(len(values)):
        if s < onset:
            continue
        prev = [v for v in values[max(0, s - window):s] if math.isfinite(v)]
        if len(prev) < window:
            continue
        med = statistics.median(prev)
        mad = statistics.median([abs(v - med) for v in prev])
        if not math.isfinite(values[s]) or values[s] > med + k * 1.4826 * mad:
            return s
    return None


def test_constants_are_the_documented_definition() -> None:
    assert (BAND_WINDOW, BAND_K, MAD_TO_SIGMA) == (50, 4.0, 1.4826)


def test_flat_noise_then_jump() -> None:
    rng = np.random.default_rng(0)
    loss = list(3.0 + 0.01 * rng.standard_normal(200))
    loss[150] += 1.0
    ex = band_exit(range(200), loss, onset=100, tokens=[512 * (s + 1) for s in range(200)])
    assert ex is not None and ex.step == 150 and ex.tokens == 512 * 151
    assert ex.value == pytest.approx(loss[150]) and ex.upper < ex.value
    assert reference_exit(loss, 100) == 150
    # Before onset the jump is not judged.
    assert band_exit(range(200), loss, onset=151) is None or band_exit(range(200), loss, onset=151).step > 150


def test_non_finite_loss_is_an_exit_and_left_out_of_later_windows() -> None:
    loss = [2.0 + 0.01 * (i % 3) for i in range(120)]
    loss[90] = float("nan")
    ex = band_exit(range(120), loss, onset=60)
    assert ex is not None and ex.step == 90 and "non-finite" in ex.reason


def test_unsorted_input_and_bad_input() -> None:
    steps = np.arange(100)[::-1]
    loss = np.concatenate([np.full(99, 1.0) + np.linspace(0, 0.01, 99), [5.0]])[::-1]
    ex = band_exit(steps, loss, onset=0)
    assert ex is not None and ex.step == 99
    with pytest.raises(ValueError, match="differ in length"):
        band_exit([1, 2], [1.0])
    with pytest.raises(ValueError, match="window"):
        band_limits([1.0, 2.0], window=1)
    with pytest.raises(ValueError, match="min_points"):
        band_limits([1.0], window=5, min_points=6)


def test_limits_use_only_predecessors() -> None:
    v = np.arange(60, dtype=float)
    med, mad, upper = band_limits(v, window=50)
    assert np.isnan(med[:50]).all()
    assert med[50] == statistics.median(range(50)) and mad[50] == 12.5
    assert upper[50] == pytest.approx(24.5 + 4 * 1.4826 * 12.5)


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(st.floats(1.0, 5.0, allow_nan=False), min_size=60, max_size=140),
    jumps=st.lists(st.tuples(st.integers(0, 139), st.floats(0.0, 10.0)), max_size=4),
    onset=st.integers(0, 120),
)
def test_matches_reference(base: list[float], jumps: list[tuple[int, float]], onset: int) -> None:
    values = list(base)
    for i, h in jumps:
        if i < len(values):
            values[i] += h
    ex = band_exit(range(len(values)), values, onset=onset)
    assert (None if ex is None else ex.step) == reference_exit(values, onset)
