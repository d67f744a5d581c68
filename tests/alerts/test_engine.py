"""The evaluator on real stores: exact state-machine transitions recorded in the ``alerts`` table,
incremental == from-scratch evaluation, and no double notification across restarts or across two
evaluator processes racing on one store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from alerts_helpers import layers, rules_yaml, scalars, writer

from healthwatch.alerts import Evaluator, JsonlSink, load_text
from healthwatch.alerts.state import InstanceState, Timing, advance
from healthwatch.store import open_store

HERE = Path(__file__).parent


def _rule(for_: int = 0, keep: int = 0, cooldown: int = 0, above: float = 3.0,
          notify: str = "[pending, firing, resolved]") -> str:
    """One threshold rule on ``loss/train`` with the given timing."""
    return rules_yaml(
        "      - alert: High\n"
        f"        expr: {{threshold: {{metric: loss/train, above: {above}}}}}\n"
        f"        for: {for_}\n"
        f"        keep_firing_for: {keep}\n"
        f"        cooldown: {cooldown}\n"
        "        severity: critical\n"
        f"        notify: {notify}\n"
        '        annotations: {summary: "loss {{ value }} at step {{ step }}"}\n'
    )


def _store_with(root: Path, values: list[float], run: str = "r1", start: int = 0) -> None:
    w = writer(root, run)
    scalars(w, "loss/train", range(start, start + len(values)), values)


def _table(root: Path) -> list[tuple[str, int, str]]:
    """``(state, step, evaluator)`` rows of the alerts table, in step order."""
    st = open_store(root)
    try:
        return [(s, int(p), e) for s, p, e in st.sql(
            "SELECT state, step, evaluator FROM alerts ORDER BY step, wall_time").fetchall()]
    finally:
        st.close()


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------
# 1. exact transitions

def test_rule_helper_builds_valid_yaml():
    rs = load_text(_rule(for_=3, keep=2, cooldown=5))
    r = rs.get("High").rule
    assert (r.for_, r.keep_firing_for, r.cooldown, r.severity) == (3, 2, 5, "critical")


def test_for_pending_firing_resolved_exact_steps_in_store(tmp_path):
    root = tmp_path / "s"
    # inactive 0-9, active 10-15, inactive 16-19, active 20-21 (too short to fire), inactive 22-24
    vals = [1.0] * 10 + [5.0] * 6 + [1.0] * 4 + [5.0] * 2 + [1.0] * 3
    _store_with(root, vals)
    sink = tmp_path / "n.jsonl"
    with Evaluator(root, load_text(_rule(for_=3)), sinks=[JsonlSink(sink)], evaluator_id="e1",
                   backfill="all") as ev:
        got = ev.evaluate_once()
    expected = [("pending", 10), ("firing", 13), ("resolved", 16), ("pending", 20), ("inactive", 22)]
    assert [(t.state, t.step) for t in got] == expected
    assert [(t.previous) for t in got] == ["inactive", "pending", "firing", "inactive", "pending"]
    assert _table(root) == [(s, p, "e1") for s, p in expected]
    # notify: pending/firing/resolved (not inactive), backfill=all
    assert [(d["state"], d["step"]) for d in _lines(sink)] == expected[:4]
    assert got[1].value == 5.0 and got[1].annotations["summary"] == "loss 5.0 at step 13"
    assert got[1].tokens == 13_000 and got[1].severity == "critical"


def test_for_zero_fires_at_once_and_nan_is_not_active(tmp_path):
    root = tmp_path / "s"
    vals = [1.0, 1.0, 5.0, math.nan, 5.0, math.inf, 1.0]
    _store_with(root, vals)
    with Evaluator(root, load_text(_rule(for_=0)), record=False) as ev:
        got = [(t.state, t.step) for t in ev.evaluate_once()]
    # NaN is never "above" (it resolves the alert); +inf is above
    assert got == [("firing", 2), ("resolved", 3), ("firing", 4), ("resolved", 6)]


def test_keep_firing_for_extends_firing(tmp_path):
    root = tmp_path / "s"
    # active 10-13, inactive 14-15, active 16, inactive 17-40
    vals = [1.0] * 10 + [5.0] * 4 + [1.0] * 2 + [5.0] + [1.0] * 24
    _store_with(root, vals)
    with Evaluator(root, load_text(_rule(for_=2, keep=5)), record=False) as ev:
        got = [(t.state, t.step) for t in ev.evaluate_once()]
    # firing at 12; the gap 14-15 is bridged; last true 16 -> resolves at the first inactive step >= 21
    assert got == [("pending", 10), ("firing", 12), ("resolved", 21)]
    with Evaluator(root, load_text(_rule(for_=2, keep=0)), record=False) as ev:
        got0 = [(t.state, t.step) for t in ev.evaluate_once()]
    assert got0 == [("pending", 10), ("firing", 12), ("resolved", 14), ("pending", 16), ("inactive", 17)]


def test_cooldown_suppresses_refiring(tmp_path):
    root = tmp_path / "s"
    # active 5-7 (fires at 5), inactive 8-9, active 10-12 (inside cooldown), inactive 13-17,
    # active 18-19 (after cooldown: 8 + 10 = 18)
    vals = [1.0] * 5 + [5.0] * 3 + [1.0] * 2 + [5.0] * 3 + [1.0] * 5 + [5.0] * 2 + [1.0]
    _store_with(root, vals)
    with Evaluator(root, load_text(_rule(for_=0, cooldown=10)), record=False) as ev:
        got = [(t.state, t.step) for t in ev.evaluate_once()]
    assert got == [("firing", 5), ("resolved", 8), ("firing", 18), ("resolved", 20)]
    # a segment straddling the end of the cooldown fires at the first step past it
    root2 = tmp_path / "s2"
    vals2 = [1.0] * 5 + [5.0] * 3 + [1.0] * 2 + [5.0] * 12 + [1.0]
    _store_with(root2, vals2)
    with Evaluator(root2, load_text(_rule(for_=2, cooldown=10)), record=False) as ev:
        got2 = [(t.state, t.step) for t in ev.evaluate_once()]
    assert got2 == [("pending", 5), ("firing", 7), ("resolved", 8), ("pending", 18), ("firing", 20),
                    ("resolved", 22)]


def _reference_states(steps: np.ndarray, active: np.ndarray, t: Timing) -> list[tuple[str, int]]:
    """A per-step, obviously-correct reimplementation of the state machine."""
    state, since, last_true, resolved_at, out = "inactive", None, None, None, []
    for s, a in zip(steps.tolist(), active.tolist()):
        if a:
            if state in ("inactive", "resolved"):
                if state == "resolved" and resolved_at is not None and s < resolved_at + t.cooldown:
                    continue
                since = s
                if t.for_ == 0:
                    state = "firing"
                    out.append(("firing", s))
                else:
                    state = "pending"
                    out.append(("pending", s))
            if state == "pending" and s >= since + t.for_:
                state = "firing"
                out.append(("firing", s))
            last_true = s
        else:
            if state == "pending":
                state = "inactive"
                out.append(("inactive", s))
            elif state == "firing" and s >= last_true + t.keep_firing_for:
                state, resolved_at = "resolved", s
                out.append(("resolved", s))
    return out


@pytest.mark.parametrize("seed", range(30))
def test_advance_matches_per_step_reference_in_any_chunking(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    steps = np.cumsum(rng.integers(1, 4, n))
    active = rng.random(n) < rng.uniform(0.2, 0.9)
    t = Timing(int(rng.integers(0, 6)), int(rng.integers(0, 8)), int(rng.integers(0, 15)))
    want = _reference_states(steps, active, t)
    st = InstanceState()
    got = [(s, int(steps[i])) for s, i in advance(st, t, steps, active)]
    assert got == want
    # fed in random chunks, the same transitions come out
    cuts = sorted(set(rng.integers(0, n, 5).tolist()) | {0, n})
    st2, got2 = InstanceState(), []
    for a, b in zip(cuts[:-1], cuts[1:]):
        got2 += [(s, int(steps[a + i])) for s, i in advance(st2, t, steps[a:b], active[a:b])]
    assert got2 == want


# ------------------------------------------------------------------------------------------
# 2. incremental == from scratch

MULTI = rules_yaml("""\
      - alert: High
        expr: {threshold: {metric: loss/train, above: 3}}
        for: 2
        keep_firing_for: 3
        notify: [pending, firing, resolved]
      - alert: Spiky
        expr: {spike: {metric: loss/train, window: 20, k: 5, min_points: 5}}
        notify: [pending, firing, resolved]
      - alert: Rising
        expr: {trend: {metric: loss/train, window: 15, rise: 0.3, smooth: 2}}
        for: 1
        notify: [pending, firing, resolved]
      - alert: VioHigh
        expr: {threshold: {metric: maxvio, above: 8}}
        for: 1
        cooldown: 7
        notify: [pending, firing, resolved]
      - alert: VioMax
        expr: {threshold: {metric: maxvio, above: 8, aggregate: max}}
        notify: [pending, firing, resolved]
      - alert: NotFinite
        expr: {nonfinite: {}}
        notify: [pending, firing, resolved]
""")


def _series(n: int, seed: int) -> tuple[list[float], dict[int, list[float]]]:
    rng = np.random.default_rng(seed)
    loss = 2.0 + 0.05 * rng.standard_normal(n)
    for _ in range(6):
        a = int(rng.integers(0, n - 5))
        loss[a:a + int(rng.integers(1, 8))] += rng.uniform(1, 4)
    loss[int(rng.integers(0, n))] = math.nan
    vio = {layer: (1.2 + 0.3 * rng.standard_normal(n)).tolist() for layer in range(4)}
    for _ in range(5):
        layer, a = int(rng.integers(0, 4)), int(rng.integers(0, n - 4))
        for s in range(a, a + int(rng.integers(1, 6))):
            vio[layer][s] = 12.0
    return loss.tolist(), vio


def _keys(ts) -> set[tuple[str, str, int]]:
    return {(t.fingerprint, t.state, t.step) for t in ts}


@pytest.mark.parametrize("seed", [0, 1])
def test_incremental_equals_from_scratch(tmp_path, seed):
    n = 240
    loss, vio = _series(n, seed)
    root = tmp_path / "s"
    w = writer(root, "r1")
    rules = load_text(MULTI)
    inc = Evaluator(root, rules, evaluator_id="inc", backfill="all")
    got: list = []
    rng = np.random.default_rng(100 + seed)
    cuts = sorted(set(rng.integers(1, n, 9).tolist()) | {0, n})
    for a, b in zip(cuts[:-1], cuts[1:]):
        steps = list(range(a, b))
        scalars(w, "loss/train", steps, loss[a:b])
        layers(w, "maxvio", steps, {layer: v[a:b] for layer, v in vio.items()})
        got += inc.evaluate_once()
        assert inc.cursor("t/High", "r1") == b - 1
    inc.close()
    assert len(got) > 10, "the series must produce transitions of several rules"
    assert {t.alert for t in got} >= {"High", "Spiky", "VioHigh", "VioMax", "NotFinite"}
    for chunk in (20_000, 17):  # one pass, and a first evaluation in chunks of 17 steps
        with Evaluator(root, rules, record=False, chunk_steps=chunk) as fresh:
            scratch = fresh.evaluate_once()
        assert _keys(scratch) == _keys(got), f"chunk_steps={chunk}"
    # every transition recorded once, by the incremental evaluator
    st = open_store(root)
    rows = st.sql("SELECT fingerprint, state, step, evaluator FROM alerts").fetchall()
    st.close()
    assert len(rows) == len(got) and {(f, s, int(p)) for f, s, p, _ in rows} == _keys(got)
    assert {e for *_, e in rows} == {"inc"}


# ------------------------------------------------------------------------------------------
# 3. restarts and two evaluators never double-notify

def test_restart_never_renotifies_and_still_notifies_later_changes(tmp_path):
    root = tmp_path / "s"
    sink = tmp_path / "n.jsonl"
    w = writer(root, "r1")
    rules = load_text(_rule(for_=3))
    scalars(w, "loss/train", range(0, 15), [1.0] * 10 + [5.0] * 5)  # pending 10, firing 13
    with Evaluator(root, rules, sinks=[JsonlSink(sink)], evaluator_id="a") as a:
        assert [(t.state, t.step) for t in a.evaluate_once()] == [("pending", 10), ("firing", 13)]
    # first look at the run: backfill "latest" notifies only the instance's state at the end
    assert [(d["state"], d["step"]) for d in _lines(sink)] == [("firing", 13)]
    # the trainer goes on while no evaluator runs: the alert resolves at 20
    scalars(w, "loss/train", range(15, 30), [5.0] * 5 + [1.0] * 10)
    for backfill in ("latest", "all", "none"):
        with Evaluator(root, rules, sinks=[JsonlSink(sink)], evaluator_id=f"b-{backfill}", backfill=backfill) as b:
            b.evaluate_once()
            b.evaluate_once()
    # the resolution of a notified firing alert is notified once (whatever the backfill policy:
    # the store says the instance was already notified), nothing is repeated
    assert [(d["state"], d["step"]) for d in _lines(sink)] == [("firing", 13), ("resolved", 20)]
    # and a later change after another restart
    scalars(w, "loss/train", range(30, 40), [5.0] * 10)
    with Evaluator(root, rules, sinks=[JsonlSink(sink)], evaluator_id="c") as c:
        c.evaluate_once()
    assert [(d["state"], d["step"]) for d in _lines(sink)][2:] == [("firing", 33)]
    assert len(_table(root)) == 5


def test_backfill_latest_on_a_fresh_store_notifies_only_active_instances(tmp_path):
    root = tmp_path / "s"
    sink = tmp_path / "n.jsonl"
    _store_with(root, [1.0] * 5 + [5.0] * 5 + [1.0] * 5 + [5.0] * 6)
    with Evaluator(root, load_text(_rule(for_=3)), sinks=[JsonlSink(sink)]) as ev:
        got = ev.evaluate_once()
    assert [(t.state, t.step) for t in got] == [("pending", 5), ("firing", 8), ("resolved", 10),
                                                ("pending", 15), ("firing", 18)]
    assert [(d["state"], d["step"]) for d in _lines(sink)] == [("firing", 18)]


CHILD = """
import sys, time, threading
from pathlib import Path
from healthwatch.alerts import Evaluator, JsonlSink, load_text
root, rules, out, name = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), Path(sys.argv[3]), sys.argv[4]
stop_file = root.parent / "stop"
ev = Evaluator(root, load_text(rules), sinks=[JsonlSink(out)], evaluator_id=name, backfill="all")
(root.parent / f"ready-{name}").write_text("1")
stop = threading.Event()
def watcher():
    while not stop_file.exists():
        time.sleep(0.01)
    stop.set()
threading.Thread(target=watcher, daemon=True).start()
ev.watch(interval=0.5, stop=stop, poll=0.005)
ev.evaluate_once()
ev.close()
"""


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_two_evaluator_processes_never_double_notify(tmp_path):
    root = tmp_path / "s"
    rules_text = _rule(for_=2)
    (tmp_path / "rules.yaml").write_text(rules_text)
    rules = load_text(rules_text)
    n = 200
    rng = np.random.default_rng(7)
    vals = np.where(rng.random(n) < 0.45, 5.0, 1.0).tolist()
    # the full series' transitions, from a reference store
    ref = tmp_path / "ref"
    _store_with(ref, vals)
    with Evaluator(ref, rules, record=False) as e:
        want = {(t.state, t.step) for t in e.evaluate_once() if t.state != "inactive"}
    assert len(want) > 30
    w = writer(root, "r1")
    scalars(w, "loss/train", [0], [1.0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(tmp_path / "rules.yaml"),
                               str(tmp_path / f"{name}.jsonl"), name], env=env)
             for name in ("A", "B")]
    try:
        _wait(lambda: all((tmp_path / f"ready-{x}").exists() for x in "AB"), 60, "both evaluators")
        st = open_store(root)
        for a in range(1, n, 10):
            b = min(n, a + 10)
            scalars(w, "loss/train", range(a, b), vals[a:b])  # both evaluators see it at once
            need = {k for k in want if k[1] < b}

            def recorded(need=need) -> bool:
                st.refresh(force=True)
                try:
                    got = {(s, int(p)) for s, p in st.sql("SELECT state, step FROM alerts").fetchall()}
                except Exception:  # noqa: BLE001 - the table may not exist yet
                    return not need
                return need <= got

            _wait(recorded, 30, f"transitions up to step {b}")
        st.close()
    finally:
        (tmp_path / "stop").write_text("1")
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0]
    a, b = _lines(tmp_path / "A.jsonl"), _lines(tmp_path / "B.jsonl")
    sent = [(d["state"], d["step"]) for d in a + b]
    assert len(sent) == len(set(sent)), "a transition was notified twice"
    assert set(sent) == want, "every transition is notified by exactly one evaluator"
    print(f"\nnotifications: A={len(a)} B={len(b)} total={len(sent)}")


def test_start_latest_skips_history_and_reads_one_window(tmp_path: Path) -> None:
    """``start="latest"``: nothing from history is alerted, only one window is read, new steps fire."""
    from alerts_helpers import rules_yaml, scalars, writer

    from healthwatch.alerts import Evaluator, load_text

    rules = load_text(rules_yaml("""\
      - alert: LossHigh
        expr: {threshold: {metric: loss/train, above: 50}}
      - alert: LossSpike
        expr: {spike: {metric: loss/train, method: mad, window: 20, k: 8, min_points: 10}}
"""))
    root = tmp_path / "store"
    w = writer(root, "r")
    values = [2.0 + 0.01 * (i % 7) for i in range(5000)]
    values[100] = 99.0  # an old excursion: history
    scalars(w, "loss/train", range(5000), values)
    history = Evaluator(root, rules, runs=["r"])
    assert {t.alert for t in history.evaluate_once() if t.state == "firing"} == {"LossHigh", "LossSpike"}
    history.close()

    ev = Evaluator(root, rules, runs=["r"], start="latest", record=False)
    assert ev.evaluate_once() == []
    assert ev._snapshot is not None and ev._snapshot.rows <= 25  # the spike window, not 5,000 steps
    scalars(w, "loss/train", range(5000, 5003), [2.0, 99.0, 99.0])
    fired = [(t.alert, t.step) for t in ev.evaluate_once() if t.state == "firing"]
    assert ("LossHigh", 5001) in fired and ("LossSpike", 5001) in fired
    ev.close()
