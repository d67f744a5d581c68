"""``Monitor(alerts=..., on_alert=...)`` on a small real model: the callback gets the transition
from the Monitor's background writer thread after the flush that carried the bad value."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from alerts_helpers import rules_yaml

import healthwatch as hw
from healthwatch.alerts import RuleFileError, load_text
from healthwatch.store import open_store

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))
from toymodel import ToyLM  # noqa: E402

RULES = rules_yaml("""\
      - alert: LossExploded
        expr: {threshold: {metric: loss/train, above: 50}}
        severity: critical
        annotations: {summary: "loss {{ value }} at step {{ step }}"}
      - alert: ResidHuge
        expr: {threshold: {metric: resid_rms, above: 1.0e30, aggregate: max}}
""")


def _train(mon: hw.Monitor, net: ToyLM, steps: range, bad: dict[int, float]) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    ids = torch.arange(8).reshape(1, 8)
    for step in steps:
        logits = net(ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
        opt.zero_grad()
        loss.backward()
        mon.after_backward()
        opt.step()
        logged = torch.tensor(bad[step]) if step in bad else loss.detach()
        mon.step(step, tokens=8 * (step + 1), loss=logged, lr=1e-3)


@pytest.mark.parametrize("rules_as", ["ruleset", "file"])
def test_on_alert_called_from_writer_thread_after_flush(store_dir, tmp_path, rules_as):
    rules = load_text(RULES)
    if rules_as == "file":
        (tmp_path / "rules.yaml").write_text(RULES)
        rules = str(tmp_path / "rules.yaml")
    got: list[tuple[object, str]] = []
    fired = threading.Event()

    def on_alert(t) -> None:
        got.append((t, threading.current_thread().name))
        if t.state == "firing":
            fired.set()

    net = ToyLM()
    with hw.Monitor(store=store_dir, run="toy", alerts=rules, on_alert=on_alert, flush_every_steps=1000,
                    flush_every_s=3600) as mon:
        mon.watch(net)
        _train(mon, net, range(0, 6), {})
        mon.flush(wait=True)
        assert got == []  # healthy steps: nothing
        _train(mon, net, range(6, 9), {7: 1000.0})
        assert not fired.is_set()  # not flushed yet: the evaluator has not seen step 7
        mon.flush(wait=True)
        assert fired.wait(60), "on_alert was not called after the flush"
        main = threading.current_thread().name
        states = [(t.alert, t.state, t.step) for t, _ in got]
        assert states == [("LossExploded", "firing", 7), ("LossExploded", "resolved", 8)]
        assert all(name != main and name.startswith("healthwatch-writer") for _, name in got)
        t = got[0][0]
        assert t.run == "toy" and t.severity == "critical" and t.value == 1000.0
        assert t.annotations["summary"] == "loss 1000.0 at step 7"
    # recorded in the store's alerts table, once
    st = open_store(store_dir)
    rows = st.sql("SELECT alert, state, step FROM alerts ORDER BY step").fetchall()
    st.close()
    assert rows == [("LossExploded", "firing", 7), ("LossExploded", "resolved", 8)]


def test_bad_rules_fail_at_monitor_construction(store_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(rules_yaml("      - alert: X\n        expr: {threshold: {metric: loss/trian, above: 1}}\n"))
    with pytest.raises(RuleFileError) as info:
        hw.Monitor(store=store_dir, run="toy", alerts=str(bad))
    assert "loss/trian" in str(info.value) and "did you mean 'loss/train'" in str(info.value)


def test_trainer_hears_a_transition_a_daemon_claimed_first(tmp_path: Path) -> None:
    """A daemon (`alerts watch`) that records and notifies a transition first must not silence the
    trainer's own callback: the trainer acts on it (stop, roll back), the daemon tells people."""
    from alerts_helpers import scalars, writer

    from healthwatch.alerts import Evaluator, monitor_evaluator

    root = tmp_path / "store"
    w = writer(root, "toy")
    scalars(w, "loss/train", range(0, 10), [2.0] * 10)
    trainer = monitor_evaluator(load_text(RULES), root, "toy")
    assert trainer.after_flush() == []  # healthy so far
    scalars(w, "loss/train", range(10, 12), [99.0, 99.0])
    daemon = Evaluator(root, load_text(RULES), runs=["toy"])
    claimed = daemon.evaluate_once()
    assert [(t.alert, t.state, t.step) for t in claimed] == [("LossExploded", "firing", 10)]
    heard = trainer.after_flush()
    assert [(t.alert, t.state, t.step) for t in heard] == [("LossExploded", "firing", 10)]
    assert trainer.after_flush() == []  # and only once
    daemon.close()
    trainer.close()
