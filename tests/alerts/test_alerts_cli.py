"""``healthwatch alerts check|packs`` as a real subprocess: malformed rule files are reported with
file, line, field and the nearest valid name; valid ones (the shipped pack) pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from healthwatch.alerts.loader import pack_path


def hw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``healthwatch <args>`` in a fresh interpreter (wide terminal: rich must not wrap lines)."""
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "healthwatch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


TYPOS = """\
groups:
  - name: g
    rules:
      - alert: Spiky
        expr:
          spike: {metric: loss/train, windw: 50, k: 6}
        severity: critcal
      - alert: Trendy
        expr:
          trend: {metric: loss/trian, window: 50, rise: 0.05}
        keep_firing: 10
      - alert: Thr
        expr:
          treshold: {metric: maxvio, above: 3}
      - alert: Ranged
        expr:
          threshold: {metric: resid_rms, layers: first_quater, above: 3}
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """One ``alerts check`` over a file full of typos and a file with a YAML syntax error."""
    d = tmp_path_factory.mktemp("check")
    typos = d / "typos.yaml"
    typos.write_text(TYPOS)
    broken = d / "broken.yaml"
    broken.write_text("groups:\n  - name: g\n    rules:\n      - alert: X\n        expr: {threshold: {metric: maxvio, above: 3}\n")
    return typos, broken, hw("alerts", "check", str(typos), str(broken))


def _line(out: str, needle: str) -> str:
    hits = [ln for ln in out.splitlines() if needle in ln]
    assert hits, f"no line with {needle!r} in:\n{out}"
    return hits[0]


def test_check_fails_with_exit_code_2(checked) -> None:
    *_, res = checked
    assert res.returncode == 2, res.stdout + res.stderr
    assert "ok " not in res.stdout


@pytest.mark.parametrize(
    ("lineno", "field", "message"),
    [
        (6, "groups[0].rules[0].expr.spike.windw", "unknown field 'windw' (did you mean 'window'?)"),
        (7, "groups[0].rules[0].severity", "got 'critcal' (did you mean 'critical'?)"),
        (10, "groups[0].rules[1].expr.trend.metric", "unknown metric 'loss/trian' (did you mean 'loss/train'?)"),
        (11, "groups[0].rules[1].keep_firing", "unknown field 'keep_firing' (did you mean 'keep_firing_for'?)"),
        (14, "groups[0].rules[2].expr.treshold", "unknown field 'treshold' (did you mean 'threshold'?)"),
        (17, "groups[0].rules[3].expr.threshold.layers", "unknown layer range 'first_quater' (did you mean 'first_quarter'?)"),
    ],
)
def test_check_names_file_line_field_and_suggests(checked, lineno: int, field: str, message: str) -> None:
    typos, _, res = checked
    line = _line(res.stderr, f" {field}: ")
    assert re.match(rf"^{re.escape(str(typos))}:{lineno}:\d+: {re.escape(field)}: ", line), line
    assert message in line, line


def test_check_reports_yaml_syntax_error_with_line(checked) -> None:
    _, broken, res = checked
    line = _line(res.stderr, str(broken))
    assert re.match(rf"^{re.escape(str(broken))}:\d+:\d+: YAML syntax: ", line), line


def test_check_missing_file_is_named(tmp_path: Path) -> None:
    res = hw("alerts", "check", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert f"{tmp_path / 'nope.yaml'}: no such file" in res.stderr


def test_check_default_pack_and_packs_listing() -> None:
    import yaml

    # Expected counts come from the YAML itself, not from the loader under test.
    doc = yaml.safe_load(pack_path("default").read_text())
    groups = sorted(g["name"] for g in doc["groups"])
    n_rules = sum(len(g["rules"]) for g in doc["groups"])
    res = hw("alerts", "check", str(pack_path("default")))
    assert res.returncode == 0, res.stderr
    want = rf"ok .*default\.yaml: {n_rules} rules in {len(groups)} groups \({re.escape(', '.join(groups))}\)"
    assert re.search(want, res.stdout), res.stdout
    res = hw("alerts", "packs")
    assert res.returncode == 0, res.stderr
    assert re.search(rf"^default: {n_rules} rules, .*default\.yaml$", res.stdout, re.M), res.stdout
    assert "default_test" not in res.stdout  # the pack's own test file is not a pack
