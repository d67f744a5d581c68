"""`healthwatch metrics`: the exposition matches what a writer logged, follows rollbacks and compaction,
and a real Prometheus scrapes it while the writer appends, answers PromQL with the logged values and
fires a stall rule on ``healthwatch_last_step_timestamp_seconds`` once the writer stops."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from interop_helpers import (
    LAYER_METRICS,
    SCALARS,
    RunWriter,
    expected_latest,
    free_port,
    http_json,
    needs_binary,
    server_process,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from healthwatch.cli import app
from healthwatch.exporters.prometheus import METRIC_NAMES, MetricsServer, StoreCollector, render
from healthwatch.exporters.source import StoreSource
from healthwatch.store import compact_store


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict, metric_name: str, **labels: str) -> float:
    return samples[(metric_name, tuple(sorted(labels.items())))]


def _check(samples: dict, run: str, exp: dict) -> None:
    assert _get(samples, "healthwatch_last_step", run=run) == exp["step"]
    assert _get(samples, "healthwatch_last_tokens", run=run) == exp["tokens"]
    assert _get(samples, "healthwatch_last_step_timestamp_seconds", run=run) == exp["wall"]
    for name, v in exp["scalars"].items():
        assert _get(samples, "healthwatch_scalar", run=run, name=name) == v
    for metric, agg in exp["layers"].items():
        assert _get(samples, "healthwatch_layer_max", run=run, metric=metric) == agg["max"]
        assert _get(samples, "healthwatch_layer_median", run=run, metric=metric) == agg["median"]
        assert _get(samples, "healthwatch_layer_argmax", run=run, metric=metric) == agg["argmax"]


def _collector(root: Path) -> StoreCollector:
    c = StoreCollector(StoreSource(root))
    c.refresh()
    return c


def test_exposition_rollback_and_compaction(tmp_path: Path) -> None:
    root = tmp_path / "store"
    a = RunWriter(root, "ultra", layers=7, seed=1)
    for lo in range(0, 20, 5):
        a.write_steps(range(lo, lo + 5), wall=1000.0 + lo)
    b = RunWriter(root, "branch", layers=7, seed=2, parent="ultra")
    b.write_steps(range(0, 3), wall=2000.0)
    c = _collector(root)
    s = _samples(render(c).decode())
    _check(s, "ultra", expected_latest(a.logged))
    _check(s, "branch", expected_latest(b.logged))
    assert _get(s, "healthwatch_run_info", run="branch", parent="ultra", precision="nvfp4") == 1
    # Bounded cardinality: per run, one series per scalar and four per layer metric, never per layer.
    per_run = [k for k in s if dict(k[1]).get("run") == "ultra"]
    assert len(per_run) == len(SCALARS) + 4 * len(LAYER_METRICS) + 4

    # Roll back: attempt 2 restarts at step 12 and logs up to 14 only. The exporter follows the
    # effective path: last step 14, values of attempt 2, although attempt 1 reached step 19.
    r = RunWriter(root, "ultra", layers=7, seed=1, attempt=2, start_step=12)
    r.write_steps(range(12, 15), wall=3000.0)
    effective = {k: v for k, v in a.logged.items() if k < 12} | r.logged
    c.refresh()
    s = _samples(render(c).decode())
    _check(s, "ultra", expected_latest(effective))
    assert _get(s, "healthwatch_last_step", run="ultra") == 14

    # Compaction rewrites the segments; the exposition does not change.
    compact_store(root)
    c.refresh()
    after = _samples(render(c).decode())
    assert {k: v for k, v in after.items() if "exporter" not in k[0]} == {k: v for k, v in s.items() if "exporter" not in k[0]}
    c.source.close()


def test_alert_state_series(tmp_path: Path) -> None:
    from healthwatch.alerts.transition import Transition, fingerprint
    from healthwatch.store import StoreWriter

    root = tmp_path / "store"
    RunWriter(root, "r1", layers=4).write_steps(range(3))
    w = StoreWriter(root, "r1", attempt=0, rank=7)
    rows = []
    for state, step in (("pending", 1), ("firing", 2)):
        t = Transition(alert="MaxVioHigh", group="moe", state=state, previous="", severity="warning", run="r1",
                       step=step, tokens=None, layer=3, value=5.0,
                       fingerprint=fingerprint("moe", "MaxVioHigh", "r1", 3, {}), wall_time=float(step))
        rows.append(t.to_row())
    t = Transition(alert="LossSpike", group="loss", state="resolved", previous="firing", severity="critical", run="r1",
                   step=2, tokens=None, layer=None, value=1.0, fingerprint=fingerprint("loss", "LossSpike", "r1", None, {}),
                   wall_time=3.0)
    rows.append(t.to_row())
    w.write("alerts", {k: [r[k] for r in rows] for k in rows[0]})
    s = _samples(render(_collector(root)).decode())
    assert _get(s, "healthwatch_alert_state", run="r1", alertname="MaxVioHigh", group="moe", severity="warning",
                layer="3") == 2
    assert _get(s, "healthwatch_alert_state", run="r1", alertname="LossSpike", group="loss", severity="critical",
                layer="") == 0


def test_cli_once_and_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "store"
    w = RunWriter(root, "r1", layers=3)
    w.write_steps(range(4), wall=50.0)
    runner = CliRunner()
    res = runner.invoke(app, ["metrics", "--store", str(root), "--once"])
    assert res.exit_code == 0, res.output
    _check(_samples(res.stdout), "r1", expected_latest(w.logged))
    names = {f.name for f in text_string_to_metric_families(res.stdout)}
    assert names <= {n.removesuffix("_total") for n in METRIC_NAMES}

    res = runner.invoke(app, ["metrics", "--store", str(tmp_path / "nope"), "--once"])
    assert res.exit_code == 2 and "no healthwatch store" in res.output

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve /metrics on 127.0.0.1:{port}"):
            MetricsServer(root, port=port).start()
        res = runner.invoke(app, ["metrics", "--store", str(root), "--port", str(port)])
        assert res.exit_code == 2 and f"127.0.0.1:{port}" in res.output


RULES = """
groups:
  - name: healthwatch
    rules:
      - alert: HealthwatchRunStalled
        expr: time() - healthwatch_last_step_timestamp_seconds > 6
        for: 2s
        labels: {severity: critical}
"""


@pytest.mark.slow
def test_real_prometheus_scrapes_and_alerts_on_stall(tmp_path: Path) -> None:
    prom = needs_binary("prometheus")
    root = tmp_path / "store"
    writer = RunWriter(root, "live", layers=6, seed=3)
    writer.write_steps(range(0, 2))
    stop = threading.Event()
    lock = threading.Lock()

    def append() -> None:
        step = 2
        while not stop.is_set():
            with lock:
                writer.write_steps([step])
            step += 1
            stop.wait(0.5)

    with MetricsServer(root, port=0, interval=0.3) as exporter:
        pport = free_port()
        (tmp_path / "rules.yml").write_text(RULES)
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [rules.yml]\n"
            "scrape_configs:\n"
            f"  - job_name: healthwatch\n    static_configs: [{{targets: ['127.0.0.1:{exporter.port}']}}]\n"
        )
        base = f"http://127.0.0.1:{pport}"
        argv = [prom, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{pport}"]
        thread = threading.Thread(target=append, daemon=True)
        thread.start()
        try:
            with server_process(argv, f"{base}/-/ready", tmp_path / "prometheus.log"):
                def query(q: str) -> list:
                    r = http_json(f"{base}/api/v1/query?query={urllib.parse.quote(q)}")
                    assert r["status"] == "success"
                    return r["data"]["result"]

                def rule_state() -> str | None:
                    groups = http_json(f"{base}/api/v1/rules")["data"]["groups"]
                    rules = [r for g in groups for r in g["rules"] if r.get("name") == "HealthwatchRunStalled"]
                    if not rules or rules[0].get("lastEvaluation", "").startswith("0001"):
                        return None
                    assert rules[0]["health"] != "err", rules[0]
                    return rules[0]["state"]

                # While the writer appends, Prometheus scrapes rising steps and the stall rule is
                # evaluated on real data and stays inactive.
                first = wait_until(lambda: query('healthwatch_last_step{run="live"}'), 60, "a first scrape")
                s0 = float(first[0]["value"][1])
                wait_until(lambda: (q := query('healthwatch_last_step{run="live"}')) and float(q[0]["value"][1]) > s0,
                           60, "Prometheus to see the step advance")
                wait_until(lambda: rule_state() == "inactive", 60, "the stall rule to be evaluated while live")
                assert not query('ALERTS{alertname="HealthwatchRunStalled"}')
                stop.set()
                thread.join(timeout=30)
                exp = expected_latest(writer.logged)

                # PromQL answers with what the writer logged last (computed here from its inputs).
                wait_until(lambda: (q := query('healthwatch_last_step{run="live"}')) and float(q[0]["value"][1]) == exp["step"],
                           60, f"Prometheus to scrape the final step {exp['step']}")
                for metric, agg in exp["layers"].items():
                    got = query(f'healthwatch_layer_max{{run="live",metric="{metric}"}}')
                    assert float(got[0]["value"][1]) == agg["max"]
                    got = query(f'healthwatch_layer_median{{run="live",metric="{metric}"}}')
                    assert float(got[0]["value"][1]) == agg["median"]
                    got = query(f'healthwatch_layer_argmax{{run="live",metric="{metric}"}}')
                    assert int(float(got[0]["value"][1])) == agg["argmax"]
                got = query('healthwatch_scalar{run="live",name="loss/mtp_2"}')
                assert float(got[0]["value"][1]) == exp["scalars"]["loss/mtp_2"]
                got = query('healthwatch_last_tokens{run="live"}')
                assert float(got[0]["value"][1]) == exp["tokens"]

                # The writer stopped: the stall rule goes pending, then fires in Prometheus.
                wait_until(lambda: rule_state() == "firing", 90, "the stall alert to fire")
                firing = query('ALERTS{alertname="HealthwatchRunStalled",alertstate="firing"}')
                assert [a["metric"]["run"] for a in firing] == ["live"]
                assert time.time() - exp["wall"] > 6
        finally:
            stop.set()
            thread.join(timeout=30)


def test_incremental_reads_keep_sparse_scalars(tmp_path: Path) -> None:
    """A scalar logged once (e.g. every 1,000 steps) keeps its value while later reads only look at new steps."""
    root = tmp_path / "store"
    w = RunWriter(root, "r1", layers=3)
    w.write_steps(range(0, 3), wall=10.0)
    w.w.write("scalars", {"attempt": [1], "step": [2], "tokens": [2 * 4096], "name": ["eval/loss"], "value": [4.25],
                          "wall_time": [10.0]})
    c = _collector(root)
    assert _get(_samples(render(c).decode()), "healthwatch_scalar", run="r1", name="eval/loss") == 4.25
    for lo in (3, 6):
        w.write_steps(range(lo, lo + 3), wall=20.0 + lo)
        c.refresh()
        s = _samples(render(c).decode())
        _check(s, "r1", expected_latest(w.logged))
        assert _get(s, "healthwatch_scalar", run="r1", name="eval/loss") == 4.25
    c.source.close()


def test_reads_while_compaction_runs(tmp_path: Path) -> None:
    """Compaction publishes new files and retires old ones under the exporter: every read succeeds
    and shows what the writer logged."""
    root = tmp_path / "store"
    w = RunWriter(root, "r1", layers=6)
    for lo in range(0, 40, 2):
        w.write_steps(range(lo, lo + 2), wall=100.0 + lo)  # 20 small segments per table to merge
    c = _collector(root)
    done = threading.Event()
    failures: list[BaseException] = []

    def compact() -> None:
        try:
            compact_store(root)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
        finally:
            done.set()

    th = threading.Thread(target=compact)
    th.start()
    reads = 0
    while not done.is_set() or reads < 3:
        c.refresh()  # raises if a read fails
        _check(_samples(render(c).decode()), "r1", expected_latest(w.logged))
        reads += 1
    th.join(timeout=120)
    assert not failures and c.errors == 0
    assert len(list((root / "table=layer_stats" / "run=r1").glob("*.parquet"))) < 20  # compaction did merge
    c.source.close()
