"""Alertmanager sink: real transitions from the evaluator go through a real Alertmanager (Debian's
0.25) to a webhook receiver the test runs; firing and resolution arrive once each; a silence made
through Alertmanager's API suppresses the notification; an unreachable Alertmanager is a clear,
counted error and loses nothing from the store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from interop_helpers import Receiver, free_port, http_json, needs_binary, server_process, wait_until

from healthwatch.alerts.alertmanager import AlertmanagerSink, AlertmanagerUnreachable, parse_alertmanager_url
from healthwatch.alerts.engine import Evaluator
from healthwatch.alerts.sinks import make_sinks
from healthwatch.schema import SCHEMA_VERSION
from healthwatch.store import StoreWriter, open_store

RULES = """
groups:
  - name: interop
    rules:
      - alert: LossHigh
        expr: {threshold: {metric: loss/train, above: 10}}
        severity: critical
        labels: {team: pretrain}
        annotations: {summary: "loss {{ value }} on {{ run }} at step {{ step }}"}
"""


class Writer:
    """A run whose loss the test sets step by step (real segments through the store writer)."""

    def __init__(self, root: Path, run: str) -> None:
        self.w = StoreWriter(root, run)
        now = time.time()
        self.w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["bf16"],
                              "config": ["{}"], "created": [now], "schema_version": [SCHEMA_VERSION]})
        self.w.write("attempts", {"attempt": [1], "start_step": [0], "started_at": [now], "host": ["t"],
                                  "reason": ["start"], "schema_version": [SCHEMA_VERSION]})

    def losses(self, start: int, values: list[float]) -> None:
        n = len(values)
        self.w.write("scalars", {"attempt": [1] * n, "step": list(range(start, start + n)),
                                 "tokens": [s * 100 for s in range(start, start + n)], "name": ["loss/train"] * n,
                                 "value": values, "wall_time": [time.time()] * n})


def _config(receiver: Receiver) -> str:
    return (
        "route:\n"
        "  receiver: hook\n"
        "  group_by: [alertname, run, layer]\n"
        "  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"
        "receivers:\n"
        f"  - name: hook\n    webhook_configs: [{{url: '{receiver.url}', send_resolved: true}}]\n"
    )


def _notes(receiver: Receiver, run: str) -> list[tuple[str, dict]]:
    """(status, alert) of every alert of ``run`` in every webhook notification received."""
    return [(a["status"], a) for body in receiver.bodies() for a in body["alerts"] if a["labels"].get("run") == run]


@pytest.mark.slow
def test_firing_resolution_and_silence_through_real_alertmanager(tmp_path: Path) -> None:
    am = needs_binary("prometheus-alertmanager")
    receiver = Receiver()
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    root = tmp_path / "store"
    port = free_port()
    (tmp_path / "am.yml").write_text(_config(receiver))
    argv = [am, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]
    base = f"http://127.0.0.1:{port}"
    try:
        with server_process(argv, f"{base}/-/ready", tmp_path / "am.log"):
            # The `alerts watch` wiring: an alertmanager:// --notify URL becomes this sink.
            sinks = make_sinks([f"alertmanager://127.0.0.1:{port}?app_url=http://127.0.0.1:8501"], console=False)
            assert [type(s).__name__ for s in sinks] == ["AlertmanagerSink"]
            sink = sinks[0]
            loud, quiet = Writer(root, "loud"), Writer(root, "quiet")
            loud.losses(0, [2.0, 2.1, 2.0])
            quiet.losses(0, [2.0, 2.1, 2.0])
            ev = Evaluator(root, str(rules), sinks=sinks)
            assert ev.evaluate_once() == []

            # Silence the run "quiet" through Alertmanager's API before anything fires.
            sil = http_json(f"{base}/api/v2/silences", {
                "matchers": [{"name": "run", "value": "quiet", "isRegex": False, "isEqual": True},
                             {"name": "alertname", "value": "LossHigh", "isRegex": False, "isEqual": True}],
                "startsAt": "2000-01-01T00:00:00Z", "endsAt": "2100-01-01T00:00:00Z",
                "createdBy": "healthwatch-test", "comment": "maintenance"})
            assert sil["silenceID"]

            loud.losses(3, [12.0, 13.0])
            quiet.losses(3, [12.0, 13.0])
            fired = ev.evaluate_once()
            assert sorted((t.run, t.state, t.step) for t in fired) == [("loud", "firing", 3), ("quiet", "firing", 3)]
            got = wait_until(lambda: _notes(receiver, "loud"), 60, "the firing notification")
            status, alert = got[0]
            assert status == "firing"
            assert alert["labels"] == {"alertname": "LossHigh", "run": "loud", "severity": "critical",
                                       "group": "interop", "team": "pretrain"}
            assert alert["annotations"]["summary"] == "loss 12.0 on loud at step 3"
            assert alert["generatorURL"] == "http://127.0.0.1:8501/run?run=loud&step=3"
            # Alertmanager holds the silenced alert as suppressed.
            wait_until(lambda: any(a["labels"]["run"] == "quiet" and a["status"]["state"] == "suppressed"
                                   for a in http_json(f"{base}/api/v2/alerts")), 60, "the silenced alert")

            loud.losses(5, [2.0, 2.0])
            quiet.losses(5, [2.0, 2.0])
            resolved = ev.evaluate_once()
            assert sorted((t.run, t.state, t.step) for t in resolved) == [("loud", "resolved", 5), ("quiet", "resolved", 5)]
            wait_until(lambda: [s for s, _ in _notes(receiver, "loud")] == ["firing", "resolved"], 60, "the resolution")
            # Another evaluation and several group intervals later: no repeated notification.
            assert ev.evaluate_once() == []
            time.sleep(4)  # several group_interval periods: a duplicate notification would come in this time
            assert [s for s, _ in _notes(receiver, "loud")] == ["firing", "resolved"]
            assert _notes(receiver, "quiet") == []
            assert sink.sent == 4 and sink.failed == 0
    finally:
        receiver.close()


def test_unreachable_alertmanager_is_a_counted_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    root = tmp_path / "store"
    w = Writer(root, "r1")
    w.losses(0, [2.0, 20.0])
    sink = AlertmanagerSink(f"http://127.0.0.1:{port}", retries=2, backoff=0.01, resend_interval=0)
    ev = Evaluator(root, str(rules), sinks=[sink])
    fired = ev.evaluate_once()  # the evaluator logs the sink's error and goes on
    assert [(t.state, t.step) for t in fired] == [("firing", 1)]
    assert sink.failed == 1 and sink.retried == 2 and sink.sent == 0
    # Nothing lost: the transition is in the store, and the sink keeps it for the next delivery.
    assert open_store(root).sql("SELECT state, step FROM alerts WHERE run = 'r1'").fetchall() == [("firing", 1)]
    with pytest.raises(AlertmanagerUnreachable, match=rf"Alertmanager at http://127.0.0.1:{port} did not accept 1 alert"):
        sink.send([])
    assert sink.failed == 2 and sink.retried == 4


def test_bad_alertmanager_urls() -> None:
    assert parse_alertmanager_url("alertmanager+https://am.example:9093/am?app_url=http://app:8501") == (
        "https://am.example:9093/am", "http://app:8501")
    with pytest.raises(ValueError, match="without host:port"):
        parse_alertmanager_url("alertmanager:///x")
    with pytest.raises(ValueError, match="must be http"):
        AlertmanagerSink("ftp://x")
