"""``sql`` detectors on the evaluation snapshot: the same answers as over the whole store, each
query seeing exactly the window its ``lookback`` asks for.

Why this matters: a ``sql`` rule used to run on the store at every evaluation and recompute its
windows over every step of every run (the default pack's MTP/train-loss ratio: ~30-60 s per
evaluation at 1M steps). A query that reads only the effective views now runs on the snapshot
the engine already loads; these tests hold it to the same answers.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from alerts_helpers import rules_yaml, scalars, writer

from healthwatch.alerts.detectors import (
    NEVER,
    Snapshot,
    Sources,
    evaluate,
    evaluate_many,
    sql_on_snapshot,
    uses_store,
)
from healthwatch.alerts.engine import Evaluator
from healthwatch.alerts.loader import load_text
from healthwatch.alerts.rules import Expr
from healthwatch.store import StoreWriter, open_store

# The default pack's MTP-2 / train-loss ratio rule (alerts/packs/default.yaml, MTPLeadsTrainLoss).
RATIO_SQL = """
WITH p AS (
  SELECT run, step, any_value(tokens) AS tokens,
         max(value) FILTER (WHERE name = 'loss/mtp_2') / max(value) FILTER (WHERE name = 'loss/train') - 1 AS r
  FROM scalars_effective WHERE name IN ('loss/train', 'loss/mtp_2') GROUP BY run, step),
w AS (
  SELECT run, step, tokens,
         avg(r) OVER (PARTITION BY run ORDER BY step RANGE BETWEEN 19 PRECEDING AND CURRENT ROW) AS now_r,
         avg(r) OVER (PARTITION BY run ORDER BY step RANGE BETWEEN 69 PRECEDING AND 50 PRECEDING) AS then_r,
         count(r) OVER (PARTITION BY run ORDER BY step RANGE BETWEEN 69 PRECEDING AND 50 PRECEDING) AS n
  FROM p WHERE isfinite(r))
SELECT run, step, tokens, now_r - then_r AS value FROM w WHERE n >= 10
"""
STEPS = 400


def _losses(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    steps = np.arange(STEPS)
    train = 3.0 + 0.01 * rng.standard_normal(STEPS)
    mtp2 = train * (1.1 + np.where(steps >= 250, 0.002 * (steps - 250), 0.0)) + 0.01 * rng.standard_normal(STEPS)
    return train, mtp2


def _reference(train: np.ndarray, mtp2: np.ndarray) -> dict[int, float]:
    """The ratio rule's value per step, computed directly from the written values (no SQL)."""
    r = mtp2 / train - 1
    out = {}
    for s in range(STEPS):
        then = r[max(0, s - 69):max(0, s - 49)]
        if len(then) >= 10:
            out[s] = float(r[max(0, s - 19):s + 1].mean() - then.mean())
    return out


def _write(root, run: str, seed: int, lo: int, hi: int, first: bool) -> None:
    """Steps ``[lo, hi)`` of ``run``'s two losses, as one flush (``first``: declare the run too)."""
    w = writer(root, run) if first else StoreWriter(root, run, attempt=1)
    train, mtp2 = _losses(seed)
    steps = list(range(lo, hi))
    scalars(w, "loss/train", steps, train[lo:hi])
    scalars(w, "loss/mtp_2", steps, mtp2[lo:hi])
    w.close()


def test_which_queries_run_on_the_snapshot():
    assert sql_on_snapshot(RATIO_SQL)
    assert sql_on_snapshot("SELECT run, step, value FROM layer_stats_effective WHERE metric = 'maxvio'")
    # Other views, other tables, a file: the store answers (the snapshot holds only the two views).
    assert not sql_on_snapshot("SELECT s.run, s.step, s.value FROM scalars_effective s JOIN runs r ON s.run = r.run")
    assert not sql_on_snapshot("SELECT run, step, 1.0 AS value FROM events")
    assert not sql_on_snapshot("SELECT run, step, value FROM scalars_all")
    assert not sql_on_snapshot("SELECT run, step, value FROM read_parquet('/nonexistent/*.parquet')")
    assert uses_store(Expr.model_validate({"sql": {"query": "SELECT run, step, 1.0 AS value FROM events"}}))
    assert not uses_store(Expr.model_validate({"sql": {"query": RATIO_SQL, "lookback": 70}}))


def test_incremental_snapshot_equals_reference_and_store(tmp_path):
    """Flush by flush through the Evaluator (snapshot path), two runs with different cursors: the
    observations equal a direct computation and the store's own one-shot evaluation."""
    root = tmp_path / "store"
    for i, run in enumerate(("a", "b")):
        _write(root, run, seed=i, lo=0, hi=100 + 30 * i, first=True)
    text = rules_yaml(
        "      - alert: Ratio\n        expr:\n          sql:\n            query: >\n"
        + "".join(f"              {line}\n" for line in RATIO_SQL.strip().splitlines())
        + "            above: 0.03\n            lookback: 70\n"
        # A second rule with a much longer window widens the snapshot: the ratio must not change.
        + "      - alert: Wide\n        expr: {trend: {metric: loss/train, window: 300, rise: 0.5}}\n")
    rules = load_text(text)
    seen: dict[str, dict[int, float]] = {"a": {}, "b": {}}
    ev = Evaluator(root, rules, record=False)
    expr = next(r for r in ev.rules if r.rule.alert == "Ratio").rule.expr
    assert not uses_store(expr)
    orig = ev._observe

    def spy(rule, obs, first):  # record what the evaluator observes, per run and step
        if rule.rule.alert == "Ratio":
            for run, step, value in obs.select("run", "step", "value").iter_rows():
                assert step not in seen[run], "a step observed twice"
                seen[run][step] = value
        return orig(rule, obs, first)

    ev._observe = spy  # type: ignore[method-assign]
    ev.evaluate_once()
    hi = {"a": 100, "b": 130}
    for lo in range(100, STEPS, 37):  # uneven flushes, runs at different cursors
        for i, run in enumerate(("a", "b")):
            top = min(STEPS, lo + 37 + 30 * i)
            if hi[run] < top:
                _write(root, run, seed=i, lo=hi[run], hi=top, first=False)
                hi[run] = top
        ev.evaluate_once()
    ev.close()
    for i, run in enumerate(("a", "b")):
        ref = _reference(*_losses(i))
        assert sorted(seen[run]) == sorted(ref)
        np.testing.assert_allclose([seen[run][s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-9)
    # The store path (whole history, no snapshot) gives the same observations.
    with open_store(root) as st:
        full = evaluate(st, expr, {"a": NEVER, "b": NEVER})
    for run in ("a", "b"):
        got = full.filter(pl.col("run") == run)
        assert dict(zip(got["step"].to_list(), got["value"].to_list())) == pytest.approx(seen[run], rel=1e-12)


def test_snapshot_query_sees_only_its_lookback(tmp_path):
    """An unbounded window (a running count) counts exactly ``lookback`` steps before the cursor
    plus the new ones, however much the snapshot holds for other rules."""
    root = tmp_path / "store"
    w = writer(root, "r")
    scalars(w, "lr", range(100), [1.0] * 100)
    w.close()
    q = ("SELECT run, step, count(*) OVER (PARTITION BY run ORDER BY step ROWS UNBOUNDED PRECEDING)::DOUBLE AS value "
         "FROM scalars_effective WHERE name = 'lr'")
    expr = Expr.model_validate({"sql": {"query": q, "lookback": 5}})
    wide = Expr.model_validate({"trend": {"metric": "lr", "window": 60, "rise": 1.0}})
    with open_store(root) as st:
        snap = Snapshot()
        snap.load(st, {"r": 10}, None, Sources())  # the snapshot holds steps 11.. (for `wide`)
        obs, _ = evaluate_many(snap, [(expr, {"r": 80}), (wide, {"r": 10})])
        # steps 76..80 are the lookback, 81.. the new steps: at step 81 the count is 6
        assert obs["step"].to_list() == list(range(81, 100))
        assert obs["value"].to_list() == [float(s - 75) for s in range(81, 100)]
        one = evaluate(st, expr, {"r": 80}, snapshot=snap)
        assert one["value"].to_list() == obs["value"].to_list()
        snap.close()
