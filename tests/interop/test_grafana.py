"""docs/grafana: the dashboard loads as JSON, every query names metrics (and label values) that the
exporter really emits for a store with runs and alerts, and its PromQL and the shipped Prometheus
rules parse with promtool (Prometheus' own checker)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from interop_helpers import RunWriter, needs_binary
from prometheus_client.parser import text_string_to_metric_families

from healthwatch.alerts.transition import Transition, fingerprint
from healthwatch.exporters.prometheus import StoreCollector, render
from healthwatch.exporters.source import StoreSource
from healthwatch.store import StoreWriter

DOCS = Path(__file__).resolve().parents[2] / "docs" / "grafana"
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
SELECTOR = re.compile(r"\b(healthwatch_[a-z_]+)\s*(\{[^}]*\})?")


def _dashboard() -> dict:
    return json.loads((DOCS / "healthwatch.json").read_text())


def _exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _exposition(tmp_path: Path) -> str:
    root = tmp_path / "store"
    RunWriter(root, "ultra", layers=8).write_steps(range(5))
    t = Transition(alert="MaxVioHigh", group="moe", state="firing", previous="pending", severity="warning",
                   run="ultra", step=4, tokens=None, layer=2, value=9.0,
                   fingerprint=fingerprint("moe", "MaxVioHigh", "ultra", 2, {}), wall_time=1.0)
    row = t.to_row()
    StoreWriter(root, "ultra", attempt=0, rank=3).write("alerts", {k: [v] for k, v in row.items()})
    c = StoreCollector(StoreSource(root))
    c.refresh()
    return render(c).decode()


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, value in matchers:
        got = labels.get(name, "")
        ok = {"=": got == value, "!=": got != value, "=~": re.fullmatch(value, got) is not None,
              "!~": re.fullmatch(value, got) is None}[op]
        if not ok:
            return False
    return True


def test_dashboard_queries_use_exported_metrics(tmp_path: Path) -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    titles = " | ".join(p["title"] for p in dash["panels"])
    for needed in ("Loss and MTP", "Gradient norms", "MaxVio", "arg-max layer", "Residual RMS max", "stall"):
        assert needed in titles, needed
    series: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(_exposition(tmp_path)):
        for s in fam.samples:
            series.setdefault(s.name, []).append(s.labels)
    exprs = _exprs(dash)
    assert len(exprs) >= 10
    for expr in exprs:
        found = SELECTOR.findall(expr.replace("$run", ".*"))
        assert found, f"no healthwatch metric in {expr!r}"
        for metric, sel in found:
            assert metric in series, f"{metric} (in {expr!r}) is not in the exporter's output"
            matchers = MATCHER.findall(sel)
            assert any(_matches(lab, matchers) for lab in series[metric]), f"no exported series matches {metric}{sel}"
    # The run variable lists runs from an exported metric.
    run_var = next(v for v in dash["templating"]["list"] if v["name"] == "run")
    assert SELECTOR.search(run_var["definition"]).group(1) in series


def test_promql_and_rules_parse_with_promtool(tmp_path: Path) -> None:
    promtool = needs_binary("promtool")
    exprs = [e.replace("$run", ".*") for e in _exprs(_dashboard())]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"healthwatch:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    f = tmp_path / "dashboard-rules.yml"
    f.write_text(json.dumps(rules))  # JSON is YAML
    for path in (f, DOCS / "healthwatch-rules.yml"):
        res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([promtool, "check", "metrics"], input=_exposition(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("bad", ['{"panels": [', "[]"])
def test_bad_dashboard_json_is_detected(bad: str) -> None:
    # The checker itself fails on a broken file (so a green test means the real file parsed).
    with pytest.raises((json.JSONDecodeError, TypeError, KeyError)):
        _exprs(json.loads(bad))
