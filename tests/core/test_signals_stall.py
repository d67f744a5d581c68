"""Stalls: the Monitor's wall-clock heartbeat, a stall rule firing on a live run that stopped stepping,
the run's other active alerts going to a visible ``no_data`` state, and resolution when steps return.

The heartbeat of the "hung" run is written an hour in the past (a real store row), so nothing here
waits on the clock or asserts a duration.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import healthwatch as hw
from healthwatch.alerts import Evaluator
from healthwatch.store import StoreWriter

RULES = """
groups:
  - name: t
    rules:
      - alert: LossHigh
        expr:
          threshold: {metric: loss/train, above: 5.0}
        severity: warning
      - alert: RunStalled
        expr:
          threshold: {metric: monitor/heartbeat, below: 0}
        no_data_after_s: 600
        severity: critical
"""


def _rows(root: Path, run: str, steps: list[int], wall: float, loss: float, close: bool = False) -> None:
    """What a Monitor writes per flush: losses and the heartbeat (here with a chosen wall time)."""
    w = StoreWriter(root, run, attempt=1)
    n = len(steps)
    w.write("scalars", {"attempt": [1] * 2 * n, "step": steps * 2, "tokens": steps * 2,
                        "name": ["loss/train"] * n + ["monitor/heartbeat"] * n,
                        "value": [loss] * n + [wall] * n, "wall_time": [wall] * 2 * n})
    if close:
        w.write("events", {"attempt": [1], "step": [steps[-1]], "tokens": [steps[-1]], "kind": ["close"],
                           "message": ["monitor closed"], "wall_time": [wall]})


def test_stall_fires_marks_no_data_and_resolves(store_dir, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    root = Path(store_dir)
    with hw.Monitor(store=store_dir, run="hung") as mon:   # declares the run; its own rows are at step 0
        mon.step(0, loss=torch.tensor(9.0))
    # Steps 1-2 an hour ago, then nothing: hung (no close event after its last step).
    _rows(root, "hung", [1, 2], time.time() - 3600, 9.0)
    # The same age, but the Monitor closed at its last step: finished, not stalled.
    _rows(root, "done", [0, 1, 2], time.time() - 3600, 1.0, close=True)

    ev = Evaluator(store_dir, rules=rules)
    first = ev.evaluate_once()
    got = {(t.run, t.alert, t.state) for t in first}
    assert ("hung", "LossHigh", "firing") in got
    assert ("hung", "RunStalled", "firing") in got
    assert ("hung", "LossHigh", "no_data") in got
    assert not [t for t in first if t.run == "done" and t.alert == "RunStalled"]
    stall = next(t for t in first if t.alert == "RunStalled")
    assert stall.step == 2 and stall.value is not None and stall.value >= 3600
    # Recorded (visible), and a second evaluation adds nothing while the run stays hung.
    st = hw.open_store(store_dir)
    states = st.sql("SELECT alert, state FROM alerts WHERE run = 'hung' ORDER BY alert, state").fetchall()
    assert ("LossHigh", "no_data") in states and ("RunStalled", "firing") in states
    st.close()
    assert ev.evaluate_once() == []

    # The trainer steps again: the stall resolves.
    _rows(root, "hung", [3], time.time(), 9.0)
    again = ev.evaluate_once()
    assert ("hung", "RunStalled", "resolved") in {(t.run, t.alert, t.state) for t in again}


def test_monitor_close_records_a_close_event(store_dir):
    with hw.Monitor(store=store_dir, run="c") as mon:
        mon.step(0, loss=1.0)
        mon.step(1, loss=1.0)
    st = hw.open_store(store_dir)
    assert st.sql("SELECT step, kind FROM events WHERE run = 'c'").fetchall() == [(1, "close")]
