"""Soak: trainer + writer + app server + alert daemon + compaction on one store, all at once.

DESIGN §10: "trainer + app + alert daemon + compaction run together without a lock error".
For about 45 seconds (bounded: the whole test stays under 3 minutes on 2 cores):

* a training process with a real ``Monitor`` on the toy model (run ``soak-train``);
* a second writer process with a bare ``StoreWriter`` appending 50-row segments (run
  ``soak-raw``), one of whose values is NaN so the alert daemon has something to fire on;
* the real app server (``healthwatch app --store S --port P``), polled over HTTP
  (``/_stcore/health`` and the page) by a client thread;
* ``healthwatch alerts watch --store S`` as a daemon subprocess writing a JSON-lines file;
* ``healthwatch compact --store S`` run again and again in a loop.

At the end every process exited cleanly (0 after an interrupt for the servers), no process
printed a traceback, lock or IO error, the HTTP client never saw a failure, and the row counts
are exact: every step of both writers exactly once, nothing dropped.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from reliability_helpers import HERE, child_env, error_lines, free_port, hw_command, wait_for

import healthwatch as hw

pytestmark = pytest.mark.slow

TRAIN_STEPS = 300
RAW_BATCHES = 120
BATCH = 50
NAN_BATCH = 100  # late: the daemon sees it live, not in its start-up backfill

TRAINER = f"""
import sys, time
sys.path.insert(0, {str(HERE)!r})
import torch
torch.set_num_threads(1)
from reliability_helpers import toy_model, train
import healthwatch as hw
model = toy_model(0)
mon = hw.Monitor(store=sys.argv[1], run="soak-train", flush_every_steps=10, flush_every_s=0.5,
                 expert_load_every=10)
mon.watch(model)
for step in range({TRAIN_STEPS}):
    train(mon, model, [step], extra=lambda s: {{"soak/step": float(s)}})
    time.sleep(0.1)  # about 35 s of training, like a slow trainer
mon.close()
print("dropped", mon.dropped_rows, flush=True)
"""

RAW_WRITER = f"""
import sys, time
import numpy as np
from healthwatch.store import StoreWriter
w = StoreWriter(sys.argv[1], "soak-raw", attempt=1, rank=0)
for i in range({RAW_BATCHES}):
    steps = np.arange(i * {BATCH}, (i + 1) * {BATCH}, dtype=np.int64)
    values = steps.astype(float)
    if i == {NAN_BATCH}:
        values[3] = float("nan")
    w.write("scalars", {{"attempt": np.ones({BATCH}, dtype=np.int32), "step": steps, "tokens": steps * 64,
                        "name": ["loss/train"] * {BATCH}, "value": values,
                        "wall_time": np.full({BATCH}, time.time())}})
    if i == 0:
        w.write("attempts", {{"attempt": [1], "start_step": [0], "started_at": [time.time()], "host": ["h"],
                             "reason": ["start"], "schema_version": ["1.0"]}})
    time.sleep(0.25)
print("written", {RAW_BATCHES} * {BATCH}, flush=True)
"""


class Proc:
    """A child process whose stdout+stderr go to a file (read back for error lines)."""

    def __init__(self, name: str, cmd: list[str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._fh = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True)

    def interrupt(self) -> None:
        """Ctrl-C the process (its own process group: the Streamlit child gets it too)."""
        if self.proc.poll() is None:
            import os

            os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        """Exit code (killed and failed after ``timeout``)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            import os

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"{self.name} did not exit within {timeout:.0f}s") from None
        finally:
            self._fh.close()

    def text(self) -> str:
        """Everything the process printed."""
        return self.log.read_text(errors="replace")


def _poll_app(port: int, stop: threading.Event, stats: dict[str, int], failures: list[str]) -> None:
    """GET the health endpoint and the page in a loop; record every failure."""
    urls = [f"http://127.0.0.1:{port}/_stcore/health", f"http://127.0.0.1:{port}/"]
    while not stop.is_set():
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body = resp.read()
                    if resp.status != 200 or (url.endswith("/") and b"<html" not in body.lower()):
                        failures.append(f"{url}: HTTP {resp.status}")
                    else:
                        stats["ok"] += 1
            except OSError as exc:
                failures.append(f"{url}: {exc}")
        stop.wait(0.2)


def test_soak_trainer_app_alerts_and_compaction_together(tmp_path: Path) -> None:
    """All five at once for ~45 s: no error anywhere, exact row counts."""
    store, logs = tmp_path / "store", tmp_path / "logs"
    logs.mkdir()
    jsonl = tmp_path / "alerts.jsonl"
    t0 = time.monotonic()
    port = free_port()
    app = Proc("app", hw_command("app", "--store", str(store), "--port", str(port)), logs)

    def healthy() -> bool:
        assert app.proc.poll() is None, f"app exited: {app.text()[-2000:]}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
        except OSError:
            return False

    procs: list[Proc] = [app]
    stop = threading.Event()
    stats = {"ok": 0}
    failures: list[str] = []
    poller = threading.Thread(target=_poll_app, args=(port, stop, stats, failures), daemon=True)
    compactions: list[int] = []
    try:
        wait_for(healthy, 90, "the app server's health endpoint", every=0.2)
        trainer = Proc("trainer", [sys.executable, "-c", TRAINER, str(store)], logs)
        raw = Proc("raw-writer", [sys.executable, "-c", RAW_WRITER, str(store)], logs)
        procs += [trainer, raw]
        wait_for(lambda: (store / "healthwatch.json").exists(), 60, "the first segment")
        watch = Proc("alerts-watch", hw_command("alerts", "watch", "--store", str(store), "--interval", "0.5",
                                                "--quiet", "--jsonl", str(jsonl)), logs)
        procs.append(watch)
        poller.start()
        soak_start = time.monotonic()
        # Compaction in a loop for as long as the writers run.
        while trainer.proc.poll() is None or raw.proc.poll() is None:
            res = subprocess.run(hw_command("compact", "--store", str(store)), capture_output=True, text=True,
                                 timeout=120, env=child_env())
            compactions.append(res.returncode)
            assert res.returncode == 0 and not error_lines(res.stdout + res.stderr), res.stdout + res.stderr
            assert time.monotonic() - t0 < 150, "the writers did not finish in time"
        soak_s = time.monotonic() - soak_start
        assert trainer.wait(30) == 0, trainer.text()[-3000:]
        assert raw.wait(30) == 0, raw.text()[-3000:]

        # The daemon catches up with the last segments and fires on the NaN.
        def fired() -> bool:
            assert watch.proc.poll() is None, watch.text()[-3000:]
            return jsonl.exists() and any(
                json.loads(line).get("alert") == "NonFiniteValues" and json.loads(line).get("state") == "firing"
                for line in jsonl.read_text().splitlines() if line.strip())

        wait_for(fired, 60, "the alert daemon to fire NonFiniteValues on soak-raw")
        # A last compaction while nothing writes: every run ends compacted.
        res = subprocess.run(hw_command("compact", "--store", str(store)), capture_output=True, text=True,
                             timeout=120, env=child_env())
        compactions.append(res.returncode)
        assert res.returncode == 0, res.stderr
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(15)
        for p in procs:
            p.interrupt()
        codes = {p.name: p.wait(30) for p in procs}
    elapsed = time.monotonic() - t0

    for p in procs:
        bad = error_lines(p.text())
        assert not bad, f"{p.name}: {bad[:5]}\n{p.text()[-3000:]}"
    assert codes == {"app": 0, "trainer": 0, "raw-writer": 0, "alerts-watch": 0}, codes
    assert not failures, failures[:5]
    assert stats["ok"] >= 20
    assert "dropped 0" in trainer.text(), trainer.text()[-2000:]
    assert len(compactions) >= 3

    st = hw.open_store(store)
    try:
        assert not st.bad_files
        # Monitor run: every step once; 8 scalars (7 Monitor signals + soak/step) and 16 layer rows per step.
        names = st.sql("SELECT count(DISTINCT name) FROM scalars WHERE run = 'soak-train'").fetchone()[0]
        train_rows = st.sql("SELECT count(*), count(DISTINCT (step, name)), count(DISTINCT step), min(step), max(step) "
                            "FROM scalars WHERE run = 'soak-train'").fetchone()
        assert train_rows == (TRAIN_STEPS * names, TRAIN_STEPS * names, TRAIN_STEPS, 0, TRAIN_STEPS - 1), train_rows
        layer_rows = st.sql("SELECT count(*), count(DISTINCT (step, layer, metric)) FROM layer_stats "
                            "WHERE run = 'soak-train'").fetchone()
        per_step_layers = layer_rows[1] // TRAIN_STEPS
        assert layer_rows == (TRAIN_STEPS * per_step_layers, TRAIN_STEPS * per_step_layers), layer_rows
        load = st.sql("SELECT count(*), count(DISTINCT (step, layer)) FROM expert_load WHERE run = 'soak-train'"
                      ).fetchone()
        assert load[0] == load[1] == (TRAIN_STEPS // 10) * 2, load  # every 10th step, 2 routers
        soak_step = st.sql("SELECT sum(value) FROM scalars WHERE run = 'soak-train' AND name = 'soak/step'"
                           ).fetchone()[0]
        assert soak_step == sum(range(TRAIN_STEPS))
        # Bare writer: every 50-row segment exactly once, the NaN kept.
        raw_rows = st.sql("SELECT count(*), count(DISTINCT step), count(*) FILTER (WHERE isnan(value)) "
                          "FROM scalars WHERE run = 'soak-raw'").fetchone()
        assert raw_rows == (RAW_BATCHES * BATCH, RAW_BATCHES * BATCH, 1), raw_rows
        for run in ("soak-train", "soak-raw"):
            assert len(st.files("scalars", run)) == 1, f"{run} not compacted to one segment"
        firing = st.sql("SELECT count(*) FROM alerts WHERE run = 'soak-raw' AND alert = 'NonFiniteValues' "
                        "AND state = 'firing'").fetchone()[0]
        assert firing == 1, "the daemon recorded the transition once (event-sourced)"
        total = train_rows[0] + layer_rows[0] + load[0] + raw_rows[0]
    finally:
        st.close()
    print(f"soak elapsed_s={elapsed:.0f} concurrent_s={soak_s:.0f} compactions={len(compactions)} "
          f"http_ok={stats['ok']} rows={total} (train scalars={train_rows[0]} layer_stats={layer_rows[0]} "
          f"expert_load={load[0]}, raw scalars={raw_rows[0]}) errors=0")
