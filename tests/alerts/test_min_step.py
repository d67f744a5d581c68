"""``min_step``: a rule's condition is ignored before that step of the run (early training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alerts_helpers import layers, rules_yaml, states, writer
from pydantic import ValidationError

from healthwatch.alerts.engine import Evaluator
from healthwatch.alerts.loader import load_rules

RULE = """      - alert: High
        expr:
          threshold: {{metric: maxvio, above: 8.0}}
        for: 10
        min_step: {min_step}
"""


def _eval(root: Path, min_step: int) -> list[tuple[str, str, int]]:
    path = root / f"rules-{min_step}.yaml"
    path.write_text(rules_yaml(RULE.format(min_step=min_step)))
    with Evaluator(root / "store", load_rules(path), record=False) as ev:
        return states(t for t in ev.evaluate_once() if t.state in ("pending", "firing"))


def test_min_step_delays_pending_and_keeps_later_episodes(tmp_path: Path) -> None:
    # MaxVio at the cap (15) during steps 10-59 (early training), healthy 2 until 99, then 12 again.
    values = [2.0] * 10 + [15.0] * 50 + [2.0] * 40 + [12.0] * 50
    w = writer(tmp_path / "store", "r")
    layers(w, "maxvio", range(150), {3: values})
    assert _eval(tmp_path, 0) == [("High", "pending", 10), ("High", "firing", 20),
                                  ("High", "pending", 100), ("High", "firing", 110)]
    # From step 40 on: the early episode is seen only from 40; from 60 on: not at all.
    assert _eval(tmp_path, 40)[:2] == [("High", "pending", 40), ("High", "firing", 50)]
    assert _eval(tmp_path, 60) == [("High", "pending", 100), ("High", "firing", 110)]


def test_min_step_must_be_non_negative(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(rules_yaml(RULE.format(min_step=-1)))
    with pytest.raises((ValidationError, ValueError), match="min_step"):
        load_rules(path)
