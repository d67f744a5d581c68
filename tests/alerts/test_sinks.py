"""Sinks against real receivers: JSON-lines files, apprise's generic JSON webhook to a real
``http.server`` on 127.0.0.1, URL redaction (also in apprise's/urllib3's own log lines), and the
flush -> notification path of a watching evaluator, counted in evaluation cycles."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from alerts_helpers import rules_yaml, scalars, writer

from healthwatch.alerts import (
    AppriseSink,
    CallbackSink,
    ConsoleSink,
    Evaluator,
    JsonlSink,
    load_text,
    redact_url,
)
from healthwatch.alerts.transition import Transition

SECRET_PW = "S3cretPassw0rd"
SECRET_TOKEN = "TOKENabcdef123456"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records each POST (in arrival order)."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                # Recorded before the response: a sender that got its 200 finds its post here.
                with outer.cond:
                    outer.posts.append({"path": self.path, "headers": dict(self.headers),
                                        "json": json.loads(body)})
                    outer.cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, n: int, timeout: float = 60.0) -> list[dict]:
        """Block until ``n`` posts arrived (AssertionError after ``timeout``)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.posts) >= n, timeout)
            assert ok, f"expected {n} posts, got {len(self.posts)}"
            return list(self.posts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _t(state: str = "firing", step: int = 13, **kw) -> Transition:
    base = dict(alert="LossHigh", group="g", state=state, previous="pending", severity="critical", run="r1",
                step=step, tokens=step * 1000, layer=None, value=5.0,
                annotations={"summary": f"loss is 5 at step {step}"}, labels={"team": "pretrain"},
                fingerprint="abc")
    base.update(kw)
    return Transition(**base)


def test_jsonl_sink_one_line_per_transition(tmp_path):
    path = tmp_path / "deep" / "n.jsonl"
    sink = JsonlSink(path)
    sink.send([_t(), _t("resolved", 20, value=float("nan"))])
    sink.send([_t("firing", 30, value=float("-inf"), layer=3)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["state"], r["step"]) for r in rows] == [("firing", 13), ("resolved", 20), ("firing", 30)]
    assert rows[0]["value"] == 5.0 and rows[1]["value"] == "nan" and rows[2]["value"] == "-inf"
    assert rows[2]["layer"] == 3 and rows[0]["annotations"]["summary"] == "loss is 5 at step 13"
    assert rows[0]["labels"] == {"team": "pretrain"} and rows[0]["alert"] == "LossHigh"


def test_console_and_callback_sinks(tmp_path):
    from rich.console import Console

    con = Console(file=(tmp_path / "out.txt").open("w"), width=200, color_system=None)
    ConsoleSink(con).send([_t()])
    con.file.close()
    text = (tmp_path / "out.txt").read_text()
    assert "firing" in text and "LossHigh" in text and "critical" in text and "step 13" in text
    got: list[Transition] = []

    def cb(t: Transition) -> None:
        if t.step == 1:
            raise RuntimeError("callback bug")
        got.append(t)

    CallbackSink(cb).send([_t(step=1), _t(step=2)])  # the first raises; the second still arrives
    assert [t.step for t in got] == [2]


def test_apprise_json_webhook_payload(receiver, caplog):
    url = f"json://alice:{SECRET_PW}@127.0.0.1:{receiver.port}/hooks/{SECRET_TOKEN}"
    caplog.set_level(logging.DEBUG)  # every logger, apprise's and urllib3's included
    sink = AppriseSink([url], timeout=30)
    sink.send([_t(), _t("resolved", 20, value=1.0, annotations={"summary": "loss back to 1"})])
    posts = receiver.wait_for(2)
    assert all(p["path"] == f"/hooks/{SECRET_TOKEN}" for p in posts)
    auth = posts[0]["headers"]["Authorization"]
    assert base64.b64decode(auth.split()[1]).decode() == f"alice:{SECRET_PW}"
    fire, res = posts[0]["json"], posts[1]["json"]
    text = fire["title"] + "\n" + fire["message"]
    for needle in ("LossHigh", "r1", "step 13", "CRITICAL", "loss is 5 at step 13", "team=pretrain"):
        assert needle in text, needle
    assert fire["type"] == "failure" and res["type"] == "success"
    assert "resolved" in res["title"] and "loss back to 1" in res["message"]
    # apprise and urllib3 logged the URL while sending; the secrets are masked in every line
    lines = [r.getMessage() for r in caplog.records]
    assert any("hooks/****" in line for line in lines), "apprise's debug lines were expected"
    assert not [line for line in lines if SECRET_PW in line or SECRET_TOKEN in line]


def test_apprise_failure_is_logged_redacted(caplog):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    sink = AppriseSink([f"json://bob:{SECRET_PW}@127.0.0.1:{port}/x/{SECRET_TOKEN}"], timeout=2)
    caplog.set_level(logging.DEBUG)
    sink.send([_t()])  # must not raise
    lines = [r.getMessage() for r in caplog.records]
    assert any("notification of LossHigh firing" in line and "failed" in line for line in lines)
    assert not [line for line in lines if SECRET_PW in line or SECRET_TOKEN in line]


def test_bad_apprise_url_rejected_with_redacted_message():
    with pytest.raises(ValueError) as info:
        AppriseSink([f"nosuchscheme://u:{SECRET_PW}@host/{SECRET_TOKEN}"])
    assert SECRET_PW not in str(info.value) and SECRET_TOKEN not in str(info.value)


@pytest.mark.parametrize("url, secrets, keep", [
    (f"json://alice:{SECRET_PW}@127.0.0.1:8080/hooks/{SECRET_TOKEN}", [SECRET_PW, SECRET_TOKEN], ["127.0.0.1"]),
    ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
     ["XXXXXXXXXXXXXXXXXXXXXXXX", "B00000000"], []),
    ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#general", ["TIiajkdnlazkcOXrIdevi7FQ", "A1BRTD4JD"], []),
    (f"mailtos://user:{SECRET_PW}@smtp.example.com?to=a@b.c", [SECRET_PW], ["smtp.example.com"]),
    (f"weird+scheme://u:{SECRET_PW}@h.example/p/{SECRET_TOKEN}?key=verysecretvalue", [SECRET_PW, SECRET_TOKEN,
                                                                                     "verysecretvalue"], []),
])
def test_redact_url_hides_credentials(url, secrets, keep):
    out = redact_url(url)
    for s in secrets:
        assert s not in out, (s, out)
    for k in keep:
        assert k in out


LATENCY_RULES = rules_yaml("""\
      - alert: LossHigh
        expr: {threshold: {metric: loss/train, above: 10}}
        severity: critical
        notify: [firing]
        annotations: {summary: "loss {{ value }} at step {{ step }}"}
""")


class _CycleEvaluator(Evaluator):
    """An Evaluator that logs, per evaluation cycle, what that cycle saw and what had arrived by its end.

    ``started`` counts cycles as they begin (before the store is listed), so a cycle numbered above
    the count read right after a flush began after that flush and must see it.
    """

    def __init__(self, *args, receiver: Receiver, rule: str, run: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.receiver, self.rule_name, self.run_name = receiver, rule, run
        self.started = 0
        #: (cycle number, rule cursor after the cycle, posts received by the end of the cycle)
        self.cycles: list[tuple[int, int, int]] = []
        self.cycle_lock = threading.Lock()

    def evaluate_once(self):
        with self.cycle_lock:
            self.started += 1
            n = self.started
        out = super().evaluate_once()
        cursor = self.cursor(self.rule_name, self.run_name)
        with self.cycle_lock:
            self.cycles.append((n, -1 if cursor is None else cursor, len(self.receiver.posts)))
        return out

    def wait_cycle_reaching(self, step: int, timeout: float = 60.0) -> tuple[int, int, int]:
        """The first logged cycle whose cursor reached ``step`` (timeout only stops a hung test)."""
        end = time.monotonic() + timeout
        while True:
            with self.cycle_lock:
                hit = next((c for c in self.cycles if c[1] >= step), None)
            if hit is not None:
                return hit
            assert time.monotonic() < end, f"no evaluation cycle reached step {step}: {self.cycles[-5:]}"
            time.sleep(0.01)


def test_alert_delivered_by_the_first_cycle_that_sees_the_flushed_step(tmp_path, receiver):
    """A bad step is written (one flushed segment) while an evaluator watches the store: the
    notification reaches the HTTP receiver by the end of the first evaluation cycle that sees the
    step, and that cycle is at the latest the first one that began after the flush.

    Logical cycles, not seconds: how long a cycle takes on a busy machine is a benchmark's business
    (``python -m benchmarks``: alert latency after a flush)."""
    trials = 10
    root = tmp_path / "s"
    w = writer(root, "r1")
    scalars(w, "loss/train", [0], [1.0])
    ev = _CycleEvaluator(root, load_text(LATENCY_RULES),
                         sinks=[AppriseSink([f"json://127.0.0.1:{receiver.port}/alert"])],
                         evaluator_id="lat", receiver=receiver, rule="t/LossHigh", run="r1")
    stop = threading.Event()
    th = threading.Thread(target=ev.watch, kwargs={"interval": 1.0, "stop": stop}, daemon=True)
    th.start()
    try:
        ev.wait_cycle_reaching(0)
        step = 0
        for i in range(trials):
            step += 1
            scalars(w, "loss/train", [step], [50.0 + i])  # the bad step, flushed
            with ev.cycle_lock:
                before_flush = ev.started  # cycles numbered above this began after the flush
            n, _, posts_by_end = ev.wait_cycle_reaching(step)
            previous = [c for c in ev.cycles if c[0] == n - 1]
            assert all(c[2] <= i for c in previous), f"trial {i}: notified before a cycle saw step {step}"
            assert posts_by_end == i + 1, f"trial {i}: cycle {n} saw step {step} but had not delivered it"
            assert n <= before_flush + 1, f"trial {i}: cycle {n} first saw the flush of cycle {before_flush}"
            post = receiver.posts[i]
            assert post["json"]["title"] == "[CRITICAL] LossHigh firing on r1"
            assert f"at step {step}" in post["json"]["message"]
            step += 1
            scalars(w, "loss/train", [step], [1.0])  # resolves (not notified): wait until evaluated
            ev.wait_cycle_reaching(step)
    finally:
        stop.set()
        th.join(10)
        ev.close()
    assert len(receiver.posts) == trials
