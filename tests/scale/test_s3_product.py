"""The product on an ``s3://`` store: Monitor, open_store, the CLI and ``alerts watch``.

A real SeaweedFS server on 127.0.0.1 (``conftest.py``); a real small model trained on CPU; the CLI
as a subprocess. Expected values are what the training loop handed to the Monitor, recorded by
the test itself, never read back from the store under test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from s3servers import ADMIN, SeaweedS3, moto_behind_ignoring_proxy

from healthwatch.objectstore import (
    S3FS,
    BucketNotFoundError,
    ConditionalWriteUnsupportedError,
    CredentialsError,
    EndpointUnreachableError,
    S3Settings,
    StoreURIError,
)
from healthwatch.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
torch = pytest.importorskip("torch")
from toymodel import ToyLM  # noqa: E402

import healthwatch as hw  # noqa: E402

#: Values logged as ``probe/v``: every special float survives the trip bit for bit.
SPECIALS = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, 1e-300]
STEPS = 64
FLUSH = 4  # 16 flushes: each writer merges its 8 oldest small segments twice (fan-out 8)
SPIKE_AT = 40  # loss/spiky jumps from 1 to 10 here (the alert rule's threshold is 5)


def _probe(step: int) -> float:
    return SPECIALS[step] if step < len(SPECIALS) else step * 1.25 - 3.0


def _train(store: str, run: str, steps: int = STEPS) -> dict[int, float]:
    """Train ToyLM for ``steps`` steps into ``store``; returns the train losses handed to the Monitor."""
    torch.manual_seed(0)
    model = ToyLM()
    losses: dict[int, float] = {}
    ids = torch.arange(8).reshape(1, 8) % 32
    with hw.Monitor(store=store, run=run, flush_every_steps=FLUSH, expert_load_every=0, queue_size=512) as mon:
        mon.watch(model)
        for step in range(steps):
            out = model(ids).float().pow(2).mean()
            out.backward()
            mon.after_backward()
            model.zero_grad(set_to_none=False)
            loss = out.detach()
            losses[step] = float(loss)  # the test's own record (the Monitor never syncs for it)
            mon.log({"probe/v": _probe(step), "loss/spiky": 10.0 if step >= SPIKE_AT else 1.0},
                    step=step, tokens=8 * (step + 1))
            mon.step(step, tokens=8 * (step + 1), loss=loss, lr=1e-3)
        dropped = mon.dropped_rows
    assert dropped == 0
    return losses


def _bits(values: list[float]) -> list[int]:
    return np.asarray(values, dtype=np.float64).view(np.uint64).tolist()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "healthwatch.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250", **(env or {})}, timeout=300)


@pytest.mark.timeout(600)
def test_monitor_trains_into_s3_and_everything_reads_it_back(s3_root: str, tmp_path: Path) -> None:
    losses = _train(s3_root, "toy-s3")
    # Nothing was written on local disk under the URI's pathlib spelling ("s3:/...").
    assert not Path("s3:").exists()

    with open_store(s3_root) as st:
        assert str(st.root).startswith("s3:/")
        rows = st.sql("SELECT step, value FROM scalars_effective WHERE run = 'toy-s3' AND name = 'loss/train' "
                      "ORDER BY step").fetchall()
        assert [s for s, _ in rows] == list(range(STEPS))
        assert _bits([v for _, v in rows]) == _bits([losses[s] for s in range(STEPS)])
        probe = st.sql("SELECT step, value FROM scalars WHERE run = 'toy-s3' AND name = 'probe/v' "
                       "ORDER BY step").fetchall()
        assert _bits([v for _, v in probe]) == _bits([_probe(s) for s in range(STEPS)])  # NaN, ±Inf, -0.0 ...
        # Per-layer rows: every (step, layer, metric) once (no duplicate after the writer's merges), all steps.
        dup = st.sql("SELECT count(*), count(DISTINCT (step, layer, metric)), count(DISTINCT step) FROM layer_stats "
                     "WHERE run = 'toy-s3'").fetchone()
        assert dup[0] == dup[1] and dup[2] == STEPS
        from healthwatch import query

        series = query.series(st, "toy-s3", "loss/train", max_points=10_000)
        assert _bits(series.sort("step")["value"].to_list()) == _bits([losses[s] for s in range(STEPS)])

    # The writer merged its own segments on S3: 16 flushes of scalars left fewer objects, one of level 1,
    # and the merge left no manifest behind.
    fs = S3FS.for_uri(s3_root)
    names = fs.list(f"{s3_root}/table=scalars/run=toy-s3")
    assert any(n.endswith("-L1.parquet") for n in names), names
    assert len([n for n in names if n.endswith(".parquet")]) < STEPS // FLUSH
    assert not [n for n in names if n.startswith("_merge-")]

    # A second Monitor on the same run numbers its attempt from the S3 store (resume = attempt 2).
    with hw.Monitor(store=s3_root, run="toy-s3", flush_every_steps=FLUSH, expert_load_every=0) as mon2:
        assert mon2.attempt == 2

    # The CLI takes the URI as it is given.
    res = _cli("runs", "--store", s3_root)
    assert res.returncode == 0, res.stderr
    assert "toy-s3" in res.stdout and s3_root in res.stdout

    # alerts watch on the S3 store fires the rule at the step the input crossed it (JSON-lines sink).
    rules = tmp_path / "rules.yaml"
    rules.write_text("extra_scalars: [loss/spiky]\ngroups:\n  - name: t\n    rules:\n      - alert: Spiky\n"
                     "        expr: {threshold: {metric: loss/spiky, above: 5}}\n        for: 0\n"
                     "        severity: critical\n")
    sink = tmp_path / "alerts.jsonl"
    res = _cli("alerts", "watch", "--store", s3_root, "--rules", str(rules), "--once", "--backfill", "all",
               "--jsonl", str(sink), "--quiet")
    assert res.returncode == 0, res.stderr
    fired = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(f["alert"], f["state"], f["step"]) for f in fired if f["state"] == "firing"] == [("Spiky", "firing", SPIKE_AT)]
    # The transition is recorded in the store's alerts table on S3, and claimed there once.
    with open_store(s3_root) as st:
        assert ("Spiky", "firing", SPIKE_AT) in st.sql("SELECT alert, state, step FROM alerts").fetchall()
    # Exactly one evaluator claimed the notification, with a create-only PUT under the store's prefix.
    assert len(fs.list(f"{s3_root}/_alert_claims/run=toy-s3")) >= 1


# -- bad input: one clear error each, at the API and at the CLI --------------------------------------


def test_unknown_scheme_is_refused_everywhere(tmp_path: Path) -> None:
    for bad in ("gs://bucket/x", "http://host/x"):
        with pytest.raises(StoreURIError, match="unsupported store URI scheme"):
            open_store(bad)
        with pytest.raises(StoreURIError, match="unsupported store URI scheme"):
            hw.Monitor(store=bad, run="r")
        for cmd in ("runs", "alerts watch --once"):
            res = _cli(*cmd.split(), "--store", bad)
            assert res.returncode == 2 and "unsupported store URI scheme" in res.stderr, res.stderr
    with pytest.raises(StoreURIError, match="has no bucket"):
        open_store("s3:///prefix")


def test_missing_bucket_wrong_credentials_unreachable_endpoint(s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        hw.Monitor(store="s3://no-such-bucket/x", run="r")
    res = _cli("runs", "--store", "s3://no-such-bucket/x")
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr

    bad_creds = {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    res = _cli("runs", "--store", "s3://hwstore/creds", env=bad_creds)
    assert res.returncode == 2 and "rejected the credentials" in res.stderr, res.stderr
    with monkeypatch.context() as m:
        for k, v in bad_creds.items():
            m.setenv(k, v)
        with pytest.raises(CredentialsError, match="rejected the credentials"):
            hw.Monitor(store="s3://hwstore/creds", run="r")

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = {"HEALTHWATCH_S3_ENDPOINT": f"http://127.0.0.1:{port}"}
    res = _cli("runs", "--store", "s3://hwstore/x", env=nowhere)
    assert res.returncode == 2 and f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in res.stderr, res.stderr
    with monkeypatch.context() as m:
        m.setenv("HEALTHWATCH_S3_ENDPOINT", f"http://127.0.0.1:{port}")
        with pytest.raises(EndpointUnreachableError, match="cannot reach the S3 endpoint"):
            hw.Monitor(store="s3://hwstore/x", run="r")


def test_monitor_refuses_a_server_that_ignores_if_none_match(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real HTTP proxy that drops If-None-Match in front of moto: an "ignoring" server.
    with moto_behind_ignoring_proxy(monkeypatch, "hwstore") as (port, proxy):
        monkeypatch.setenv("HEALTHWATCH_S3_ENDPOINT", proxy.endpoint)
        with pytest.raises(ConditionalWriteUnsupportedError, match="ignores If-None-Match") as err:
            hw.Monitor(store="s3://hwstore/ignoring", run="r")
        assert proxy.endpoint in str(err.value)
        # Refused before anything was written: no store metadata, no segment.
        assert S3FS("hwstore", S3Settings(endpoint_url=f"http://127.0.0.1:{port}")).walk("s3://hwstore/ignoring") == []


# -- the app in headless Chromium on an s3:// store ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(600)
def test_app_shows_an_s3_store_in_headless_chromium(s3_root: str) -> None:
    from _deps import require

    require("chromium", "Debian chromium (apt-get install -y chromium chromium-driver)")
    require("chromedriver", "Debian chromium-driver (apt-get install -y chromium chromium-driver)")
    require("selenium", "selenium (in the [dev] extra)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from selenium.webdriver.common.by import By

    from benchmarks.apphost import app_server, headless_chromium, wait_for

    _train(s3_root, "toy-app", steps=16)
    plots_js = "return Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p => p.data).length"
    running_js = "return !!document.querySelector('[data-testid=\"stStatusWidget\"]')"
    # `healthwatch app --store s3://…` (a child process; the S3 endpoint and keys come from the environment).
    with app_server(s3_root) as url, headless_chromium() as driver:
        driver.get(f"{url}/run?run=toy-app")
        wait_for(lambda: any(h.text == "Run" for h in driver.find_elements(By.CSS_SELECTOR, "h1")), 120, "the Run title")
        wait_for(lambda: driver.execute_script(plots_js) >= 1, 180, "a plotly chart of the s3 run")
        wait_for(lambda: not driver.execute_script(running_js), 120, "the script run to finish")
        assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "Traceback" not in body and "No healthwatch store" not in body
        # The loss chart holds the 16 steps the Monitor wrote to S3.
        steps = driver.execute_script(
            "for (const p of document.querySelectorAll('.js-plotly-plot')) {"
            "  for (const t of (p._fullData || [])) { if ((t.name || '').includes('loss/train')) return t.x.length; } }"
            "return null;")
        assert steps == 16, steps
