"""Soak: trainer + second writer + app in a real browser + alert daemon + compaction, all at once.

DESIGN §10: "trainer + app + alert daemon + compaction run together without a lock error", and
the app must keep working for the people looking at it while that happens. On one store:

* a training process with a real ``Monitor`` on the toy model (run ``soak-train``);
* a second writer process with a bare ``StoreWriter`` appending 50-row segments (run
  ``soak-raw``); on cue it writes one NaN, which the alert daemon must fire on;
* the real app server (``healthwatch app``) driven by headless Chromium: the Run, Divergence and
  Alerts pages are loaded again and again (``ROUNDS`` rounds), each time until its charts are
  drawn and its script run has finished, with no exception on the page;
* ``healthwatch alerts watch`` as a daemon subprocess writing a JSON-lines file;
* ``healthwatch compact`` run again and again in a loop.

Pacing is logical, not in seconds: before each page load the writers get a budget of steps /
segments to write (so they write while the page loads, and the store's size does not depend on how
busy the machine is), and they run until the browser has done its rounds, then report what they
logged. The expected row counts come from those reports and the model's shape, never
from the store under test. At the end: every process exited cleanly, none printed a traceback or a
lock/IO error, and the store holds every logged row exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from _deps import require
from reliability_helpers import HERE, child_env, error_lines, hw_command, wait_for

import healthwatch as hw

# Generous: a timeout only stops a hang (12 page loads with charts on a busy 2-core machine).
pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(1800)]

ROUNDS = 3  # browser rounds over the three pages while everything runs
BATCH = 50
EXPERT_LOAD_EVERY = 10
#: What the writers may write for each page load (handed out just before it): they write while the
#: page loads, and the store's size does not depend on how slow the machine is.
TRAIN_STEPS_PER_LOAD, RAW_SEGMENTS_PER_LOAD = 20, 4

# Trains within its budget (the number in the budget file) until the stop file appears, then
# reports what it handed to the Monitor.
TRAINER = f"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(HERE)!r})
import torch
torch.set_num_threads(1)
from reliability_helpers import toy_model, train
import healthwatch as hw
stop, budget = Path(sys.argv[2]), Path(sys.argv[3])
model = toy_model(0)
mon = hw.Monitor(store=sys.argv[1], run="soak-train", flush_every_steps=10, flush_every_s=0.5,
                 expert_load_every={EXPERT_LOAD_EVERY}, queue_size=100_000)
mon.watch(model)
step = 0
while not stop.exists():
    if step >= int(budget.read_text() or 0):
        time.sleep(0.05)  # budget spent: wait for the next page load's
        continue
    train(mon, model, [step], extra=lambda s: {{"soak/step": float(s)}})
    step += 1
    time.sleep(0.05)  # a slow trainer: leaves the 2 cores to the app and the browser
mon.close()
blocks = len(model.layers)
routers = sum(1 for b in model.layers if hasattr(b, "router"))
print("REPORT " + json.dumps({{"steps": step, "dropped": mon.dropped_rows, "blocks": blocks, "routers": routers,
                              "scalars": ["loss/train", "loss/mtp_1", "loss/mtp_2", "lr", "soak/step"]}}), flush=True)
"""

# Appends 50-step segments within its budget until the stop file appears; writes one NaN once the
# cue file exists.
RAW_WRITER = f"""
import json, sys, time
from pathlib import Path
import numpy as np
from healthwatch.store import StoreWriter
stop, cue, budget = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
w = StoreWriter(sys.argv[1], "soak-raw", attempt=1, rank=0)
i, nan_at = 0, None
while not stop.exists():
    if i >= int(budget.read_text() or 0):
        time.sleep(0.05)
        continue
    steps = np.arange(i * {BATCH}, (i + 1) * {BATCH}, dtype=np.int64)
    values = steps.astype(float)
    if nan_at is None and cue.exists():
        nan_at = int(steps[3])
        values[3] = float("nan")
    w.write("scalars", {{"attempt": np.ones({BATCH}, dtype=np.int32), "step": steps, "tokens": steps * 64,
                        "name": ["loss/train"] * {BATCH}, "value": values,
                        "wall_time": np.full({BATCH}, time.time())}})
    if i == 0:
        w.write("attempts", {{"attempt": [1], "start_step": [0], "started_at": [time.time()], "host": ["h"],
                             "reason": ["start"], "schema_version": ["1.0"]}})
    i += 1
    time.sleep(0.25)
print("REPORT " + json.dumps({{"segments": i, "rows": i * {BATCH}, "nan_at": nan_at}}), flush=True)
"""

PLOTS_JS = "return Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p => p.data).length"
RUNNING_JS = "return !!document.querySelector('[data-testid=\"stStatusWidget\"]')"
EXCEPTION_CSS = "[data-testid='stException']"
# Points of the trainer's loss/train trace on the page (decoded arrays live in _fullData).
LOSS_POINTS_JS = ("return Math.max(0, ...Array.from(document.querySelectorAll('.js-plotly-plot'))"
                  ".map(p => ((p._fullData || []).find(t => t.name === 'loss/train') || {}).x)"
                  ".filter(x => x).map(x => x.length))")


class Proc:
    """A child process in its own process group, output to a file (read back for error lines)."""

    def __init__(self, name: str, cmd: list[str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._fh = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True)

    def interrupt(self) -> None:
        """Ctrl-C the process group (a server's children get it too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        """Exit code (killed and failed after ``timeout``, which only stops a hang)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"{self.name} did not exit within {timeout:.0f}s") from None
        finally:
            self._fh.close()

    def text(self) -> str:
        """Everything the process printed."""
        return self.log.read_text(errors="replace")

    def report(self) -> dict:
        """The ``REPORT {json}`` line the process printed at its end."""
        lines = [ln for ln in self.text().splitlines() if ln.startswith("REPORT ")]
        assert lines, f"{self.name} printed no report:\n{self.text()[-3000:]}"
        return json.loads(lines[-1][len("REPORT "):])


def _compact_loop(store: Path, stop: threading.Event, results: list[tuple[int, str]]) -> None:
    """``healthwatch compact`` again and again until ``stop``."""
    while not stop.is_set():
        res = subprocess.run(hw_command("compact", "--store", str(store)), capture_output=True, text=True,
                             timeout=300, env=child_env())
        results.append((res.returncode, res.stdout + res.stderr))


def _load_page(driver, url: str | None, title: str, min_plots: int, page_errors: list[str],
               before: Callable[[], None] = lambda: None) -> str:
    """Load ``url`` in the browser (``None``: reload the page shown); wait for its title, ``min_plots``
    drawn charts and the end of the script run; record any exception shown. ``before`` runs just
    before the load. Returns the page text."""
    from selenium.webdriver.common.by import By

    before()
    if url is None:
        driver.refresh()
    else:
        driver.get(url)
    wait_for(lambda: any(h.text == title for h in driver.find_elements(By.CSS_SELECTOR, "h1")), 120,
             f"the {title} page title")
    if min_plots:
        wait_for(lambda: driver.execute_script(PLOTS_JS) >= min_plots, 120, f"{min_plots} chart(s) on {title}")
    wait_for(lambda: not driver.execute_script(RUNNING_JS), 120, f"the {title} script run to finish")
    body = driver.find_element(By.TAG_NAME, "body").text
    shown = driver.find_elements(By.CSS_SELECTOR, EXCEPTION_CSS)
    if shown or "Traceback" in body:
        page_errors.append(f"{url}: {[e.text[:500] for e in shown] or body[-1500:]}")
    return body


def test_soak_trainer_browser_alerts_and_compaction_together(tmp_path: Path) -> None:
    """All at once, for ``ROUNDS`` browser rounds: no error anywhere, pages work, exact row counts."""
    require("chromium", "Debian chromium (apt-get install -y chromium chromium-driver)")
    require("chromedriver", "Debian chromium-driver (apt-get install -y chromium chromium-driver)")
    require("selenium", "selenium (in the [dev] extra)")
    from benchmarks.apphost import headless_chromium, start_app, stop

    store, logs = tmp_path / "store", tmp_path / "logs"
    logs.mkdir()
    jsonl, stop_file, nan_cue = tmp_path / "alerts.jsonl", tmp_path / "stop", tmp_path / "nan"
    train_budget, raw_budget = tmp_path / "train-budget", tmp_path / "raw-budget"
    budgets = {"train": 0, "raw": 0}

    def hand_out() -> None:
        """One page load's worth of writing for each writer (written atomically)."""
        budgets["train"] += TRAIN_STEPS_PER_LOAD
        budgets["raw"] += RAW_SEGMENTS_PER_LOAD
        for path, n in ((train_budget, budgets["train"]), (raw_budget, budgets["raw"])):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(n))
            tmp.replace(path)

    hand_out()
    procs: list[Proc] = []
    compact_stop = threading.Event()
    compactions: list[tuple[int, str]] = []
    compactor = threading.Thread(target=_compact_loop, args=(store, compact_stop, compactions), daemon=True)
    page_errors: list[str] = []
    loads = {"Run": 0, "Divergence": 0, "Alerts": 0}
    app = None
    try:
        trainer = Proc("trainer", [sys.executable, "-c", TRAINER, str(store), str(stop_file), str(train_budget)], logs)
        raw = Proc("raw-writer", [sys.executable, "-c", RAW_WRITER, str(store), str(stop_file), str(nan_cue),
                                  str(raw_budget)], logs)
        procs += [trainer, raw]
        wait_for(lambda: (store / "table=scalars" / "run=soak-train").is_dir(), 120, "the trainer's first segment")
        watch = Proc("alerts-watch", hw_command("alerts", "watch", "--store", str(store), "--interval", "0.5",
                                                "--quiet", "--jsonl", str(jsonl)), logs)
        procs.append(watch)
        compactor.start()
        app, url = start_app(store, log=logs / "app.log", timeout=180)

        def fired() -> bool:
            assert watch.proc.poll() is None, watch.text()[-3000:]
            return jsonl.exists() and any(
                json.loads(line).get("alert") == "NonFiniteValues" and json.loads(line).get("state") == "firing"
                and json.loads(line).get("run") == "soak-raw"
                for line in jsonl.read_text().splitlines() if line.strip())

        with headless_chromium(size=(1400, 1800), profile=tmp_path / "chrome") as driver:
            for rnd in range(ROUNDS):
                _load_page(driver, f"{url}/run?run=soak-train", "Run", 1, page_errors, hand_out)
                loads["Run"] += 1
                assert driver.execute_script(LOSS_POINTS_JS) > 0, "the Run page drew no loss/train points"
                _load_page(driver, f"{url}/divergence?run=soak-train", "Divergence", 1, page_errors, hand_out)
                loads["Divergence"] += 1
                if rnd == 0:
                    # The NaN is written only now: the daemon has been watching for a whole round.
                    nan_cue.write_text("1")
                    hand_out()  # the raw writer's next segment carries the NaN
                    wait_for(fired, 180, "the alert daemon to fire NonFiniteValues on soak-raw")
                body = _load_page(driver, f"{url}/alerts", "Alerts", 1, page_errors, hand_out)
                loads["Alerts"] += 1
                assert "NonFiniteValues" in body, body[-2000:]
                _load_page(driver, None, "Alerts", 1, page_errors, hand_out)  # a plain reload, as a person would
                loads["Alerts"] += 1
            # Everything was still running during every round: the writers stop only now.
            assert trainer.proc.poll() is None and raw.proc.poll() is None and watch.proc.poll() is None
        stop_file.write_text("1")
        assert trainer.wait(180) == 0, trainer.text()[-3000:]
        assert raw.wait(180) == 0, raw.text()[-3000:]
        compact_stop.set()
        compactor.join(300)
        # A last compaction while nothing writes: every run ends compacted.
        res = subprocess.run(hw_command("compact", "--store", str(store)), capture_output=True, text=True,
                             timeout=300, env=child_env())
        compactions.append((res.returncode, res.stdout + res.stderr))
    finally:
        stop_file.write_text("1")
        compact_stop.set()
        if app is not None:
            stop(app)
        for p in procs:
            p.interrupt()
        codes = {p.name: p.wait(60) for p in procs}

    assert not page_errors, page_errors[:3]
    assert loads == {"Run": ROUNDS, "Divergence": ROUNDS, "Alerts": 2 * ROUNDS}
    for p in procs:
        bad = error_lines(p.text())
        assert not bad, f"{p.name}: {bad[:5]}\n{p.text()[-3000:]}"
    app_bad = error_lines((logs / "app.log").read_text(errors="replace"))
    assert not app_bad, app_bad[:5]
    assert codes == {"trainer": 0, "raw-writer": 0, "alerts-watch": 0}, codes
    assert len(compactions) >= 2
    for rc, out in compactions:
        assert rc == 0 and not error_lines(out), out[-3000:]

    t, r = trainer.report(), raw.report()
    assert t["dropped"] == 0 and t["steps"] > 0 and r["nan_at"] is not None, (t, r)
    assert t["steps"] <= budgets["train"] and r["segments"] <= budgets["raw"], (t, r, budgets)
    steps, blocks, routers = t["steps"], t["blocks"], t["routers"]
    st = hw.open_store(store)
    try:
        assert not st.bad_files
        # What the trainer handed to the Monitor: each of its scalars once per step.
        for name in t["scalars"]:
            got = st.sql("SELECT count(*), count(DISTINCT step), min(step), max(step) FROM scalars "
                         "WHERE run = 'soak-train' AND name = ?", [name]).fetchone()
            assert got == (steps, steps, 0, steps - 1), (name, got, steps)
        assert st.sql("SELECT sum(value) FROM scalars WHERE run = 'soak-train' AND name = 'soak/step'"
                      ).fetchone()[0] == sum(range(steps))
        dup = st.sql("SELECT count(*) - count(DISTINCT (step, name)) FROM scalars WHERE run = 'soak-train'").fetchone()
        assert dup == (0,), "a (step, name) of the trainer is stored twice"
        # The signals DESIGN §3 defines, from the model's shape: 3 per block, 2 per router, per step.
        for metric, per_step in (("wgrad_norm", blocks), ("resid_rms", blocks), ("resid_rms_max", blocks),
                                 ("maxvio", routers), ("dead_experts", routers)):
            got = st.sql("SELECT count(*), count(DISTINCT (step, layer)) FROM layer_stats "
                         "WHERE run = 'soak-train' AND metric = ?", [metric]).fetchone()
            assert got == (steps * per_step, steps * per_step), (metric, got, steps, per_step)
        load = st.sql("SELECT count(*), count(DISTINCT (step, layer)) FROM expert_load WHERE run = 'soak-train'"
                      ).fetchone()
        expected_load = len(range(0, steps, EXPERT_LOAD_EVERY)) * routers
        assert load == (expected_load, expected_load), (load, expected_load)
        # The bare writer: every row once, the NaN where it was written.
        raw_rows = st.sql("SELECT count(*), count(DISTINCT step), min(step) FILTER (WHERE isnan(value)), "
                          "count(*) FILTER (WHERE isnan(value)) FROM scalars WHERE run = 'soak-raw'").fetchone()
        assert raw_rows == (r["rows"], r["rows"], r["nan_at"], 1), (raw_rows, r)
        for run in ("soak-train", "soak-raw"):
            assert len(st.files("scalars", run)) == 1, f"{run} not compacted to one segment"
        firing = st.sql("SELECT count(*) FROM alerts WHERE run = 'soak-raw' AND alert = 'NonFiniteValues' "
                        "AND state = 'firing'").fetchone()[0]
        assert firing == 1, "the daemon recorded the transition once (event-sourced)"
    finally:
        st.close()
    print(f"soak: trainer steps={steps} raw rows={r['rows']} page loads={sum(loads.values())} "
          f"compactions={len(compactions)} errors=0")
