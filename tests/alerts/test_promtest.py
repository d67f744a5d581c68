"""promtool-style rule unit tests: the value notation, the shipped pack's own test file, and a wrong
expectation failing with a readable diff (through the real ``healthwatch alerts test`` CLI)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from healthwatch.alerts.loader import RuleFileError, load_pack, pack_path
from healthwatch.alerts.promtest import expand_values, load_test_file, run_test_file

PACK_TEST = pack_path("default").with_name("default_test.yaml")


def hw(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``healthwatch <args>`` in a fresh interpreter with a wide terminal."""
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "healthwatch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------ notation


def test_expand_values_notation() -> None:
    assert expand_values("1+1x3") == [1.0, 2.0, 3.0, 4.0]
    assert expand_values("5-2x2") == [5.0, 3.0, 1.0]
    assert expand_values("7x2 _ _x2 8") == [7.0, 7.0, 7.0, None, None, None, 8.0]
    out = expand_values("NaN Inf -Inf 1e-3")
    assert math.isnan(out[0]) and out[1] == math.inf and out[2] == -math.inf and out[3] == 1e-3


@pytest.mark.parametrize("bad", ["1+x3", "abc", "1x", "2*3"])
def test_expand_values_rejects_bad_tokens(bad: str) -> None:
    with pytest.raises(ValueError, match="bad value"):
        expand_values(bad)


# ------------------------------------------------------------------------------------------ coverage


def test_pack_test_file_covers_every_rule_firing_and_quiet() -> None:
    """Every rule of the default pack has a case where it is expected firing and one where it must
    stay quiet (an empty expectation or ``never_fire``)."""
    tf, rules = load_test_file(PACK_TEST)
    pack = {r.rule.alert for r in load_pack("default")}
    assert {r.rule.alert for r in rules} == pack
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tf.tests:
        for chk in case.alert_rule_test:
            (firing if chk.exp_alerts else quiet).add(chk.alertname)
        quiet.update(pack if case.never_fire == "all" else case.never_fire)
    # A rule that fires on wall-clock silence (``no_data_after_s``, e.g. RunStalled) cannot be given a
    # firing case in a step-indexed test file; its firing path is tested against a real store in
    # tests/core/test_signals_stall.py, and it still needs a quiet case here.
    wall_clock = {r.rule.alert for r in load_pack("default") if getattr(r.rule, "no_data_after_s", None)}
    assert (Path(__file__).parent.parent / "core" / "test_signals_stall.py").exists()
    assert pack - firing - wall_clock == set(), "rules without a firing case"
    # a quiet case of its own for every rule, not only the all-quiet healthy run
    own_quiet = {n for c in tf.tests if c.never_fire != "all" for n in c.never_fire}
    own_quiet |= {chk.alertname for c in tf.tests for chk in c.alert_rule_test if not chk.exp_alerts}
    assert pack - own_quiet == set(), "rules without a quiet case"
    assert any(c.never_fire == "all" for c in tf.tests)


# ------------------------------------------------------------------------------------------ CLI

WRONG = """\
rule_files: [{pack}]
tests:
  - name: right
    input_series:
      - series: loss/train
        values: "2.0x59 3.0 2.0x40"
    alert_rule_test:
      - eval_step: 60
        alertname: LossSpike
        exp_alerts:
          - labels: {{severity: critical}}
  - name: deliberately wrong
    input_series:
      - series: loss/train
        values: "2.0x59 3.0 2.0x40"
      - series: maxvio
        layer: 4
        values: "1.2x100"
    alert_rule_test:
      - eval_step: 60
        alertname: LossSpike
        exp_alerts:
          - labels: {{severity: warning}}
      - eval_step: 61
        alertname: MaxVioHigh
        exp_alerts:
          - labels: {{layer: "4"}}
      - eval_step: 70
        alertname: LossSpike
        exp_alerts: []
"""


def test_wrong_expectation_fails_with_readable_diff(tmp_path: Path) -> None:
    f = tmp_path / "wrong_test.yaml"
    f.write_text(WRONG.format(pack=pack_path("default")))
    res = hw("alerts", "test", str(f))
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert f"PASS {f}: right" in out
    assert f"FAIL {f}: deliberately wrong" in out
    # what was expected, and what fired instead (alert, run, since which step, value)
    assert ("eval_step 60, LossSpike: expected firing with labels {'severity': 'warning'}, got 1 firing: "
            "['LossSpike{run=run} since step 60 value 3']") in out
    assert "eval_step 61, MaxVioHigh: expected firing with labels {'layer': '4'}, got 0 firing: []" in out
    assert "eval_step 70, LossSpike: unexpected firing alert LossSpike{run=run} since step 60 value 3" in out


def test_invalid_test_file_names_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "typo_test.yaml"
    f.write_text("rule_files: [default]\ntests:\n  - name: x\n    input_series:\n      - series: loss/train\n"
                 "        valeus: '1x3'\n")
    with pytest.raises(RuleFileError) as exc:
        run_test_file(f)
    msg = str(exc.value)
    assert f"{f}:6:9: tests[0].input_series[0].valeus: unknown field 'valeus' (did you mean 'values'?)" in msg
    res = hw("alerts", "test", str(f))
    assert res.returncode == 1
    assert "did you mean 'values'?" in res.stderr


def test_default_pack_test_file_passes_via_cli() -> None:
    """``healthwatch alerts test`` on the pack's own test file: every case passes."""
    res = hw("alerts", "test", str(PACK_TEST), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    n_cases = len(YAML(typ="safe").load(PACK_TEST.read_text())["tests"])
    assert res.stdout.count("PASS ") == n_cases, res.stdout
    assert "FAIL" not in res.stdout
