"""`healthwatch demo --quick --no-app` builds the store the app and the alerts are shown on.

The end-to-end test runs the command on a smaller plan than ``--quick``'s (:data:`SMALL`: 60
steps, fault from step 20, 10-step branches, about 140 training steps instead of 310): the same
scenario code (fault, alerts, stop, rollback, three BF16 branches, compaction, summary) with
fewer steps in each phase. What depends on the plan's numbers alone (three distinct branch
checkpoints, onset inside the run) is checked on ``--quick``'s and the full demo's own plans
without training.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import healthwatch as hw
from healthwatch.cli import app
from healthwatch.demo import scenario
from healthwatch.demo.scenario import FULL, QUICK, DemoPlan

#: The smallest plan with every phase of the scenario: checkpoints before the fault's onset to roll
#: back to, attempt 1 past them (superseded rows), three distinct branch checkpoints.
SMALL = DemoPlan(total_steps=60, onset=20, checkpoint_every=10, branch_steps=10)


@pytest.mark.parametrize("plan", [QUICK, FULL, SMALL], ids=["quick", "full", "small"])
def test_demo_plans_have_every_phase(plan: DemoPlan) -> None:
    """The fault starts inside the run after a checkpoint to roll back to, and the branch points
    pick three distinct checkpoints (as ``run_demo`` picks them: nearest to each fraction)."""
    assert 0 < plan.checkpoint_every <= plan.onset < plan.total_steps and plan.branch_steps > 0
    checkpoints = range(0, plan.total_steps + 1, plan.checkpoint_every)
    points = {min(checkpoints, key=lambda s, f=f: abs(s - f * plan.total_steps)) for f in plan.branch_points}
    assert len(points) == 3 and all(0 < s < plan.total_steps for s in points), points


@pytest.mark.slow
def test_quick_demo_store_contents(tmp_path, monkeypatch):
    store = tmp_path / "demo-store"
    monkeypatch.setattr(scenario, "QUICK", SMALL)  # the size only: the command and the scenario are real
    res = CliRunner().invoke(app, ["demo", "--quick", "--no-app", "--store", str(store)])
    assert res.exit_code == 0, res.output
    assert "demo store:" in res.output
    # The summary names the first rule that fired and measures its lead against the loss's band
    # exit (healthwatch.band), or says the loss had not left its band when training stopped.
    assert "first rule to fire:" in res.output or "no rule fired" in res.output
    assert "left its band at step" in res.output or "had not left its band" in res.output
    # The closing gap summary is a table (one row per branch), not a dataframe dump or a bare "-".
    assert "mean gap %" in res.output and "shape:" not in res.output and "at step -" not in res.output
    st = hw.open_store(store)
    main = "ultra-nvfp4"
    attempts = st.sql("SELECT attempt, start_step, reason FROM attempts WHERE run = ? ORDER BY attempt", [main]).fetchall()
    assert len(attempts) >= 2 and attempts[1][2] == "rollback"
    branches = st.sql(
        "SELECT run, branch_step, branch_tokens, precision FROM runs WHERE parent = ? ORDER BY branch_step", [main]
    ).fetchall()
    assert len(branches) >= 3
    assert all(b[1] is not None and b[2] and b[2] > 0 and b[3] == "bf16" for b in branches)
    summary_rows = [line for line in res.output.splitlines() if line.startswith("│")]
    for run, step, _tokens, _precision in branches:
        assert any(run in line and f" {step} " in line for line in summary_rows), (run, summary_rows)
    scalars = {r[0] for r in st.sql("SELECT DISTINCT name FROM scalars WHERE run = ?", [main]).fetchall()}
    assert {"loss/train", "loss/mtp_1", "loss/mtp_2", "grad_norm/total", "grad_norm/output", "lr"} <= scalars
    metrics = {r[0] for r in st.sql("SELECT DISTINCT metric FROM layer_stats WHERE run = ?", [main]).fetchall()}
    assert {"maxvio", "dead_experts", "resid_rms", "resid_rms_max", "wgrad_norm"} <= metrics
    assert st.sql("SELECT count(*) FROM expert_load WHERE run = ?", [main]).fetchone()[0] > 0
    kinds = {r[0] for r in st.sql("SELECT DISTINCT kind FROM events WHERE run = ?", [main]).fetchall()}
    assert {"checkpoint", "rollback"} <= kinds
    # The diverged path of attempt 1 is kept as evidence, hidden from the effective view.
    assert st.sql("SELECT count(*) FROM scalars_all WHERE run = ? AND superseded", [main]).fetchone()[0] > 0


def test_lead_over_band_reads_attempt_one_and_uses_the_band(tmp_path):
    """The demo's lead line: first firing rule vs the band exit of attempt 1's recorded loss."""
    import sys
    from dataclasses import dataclass
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "alerts"))
    from alerts_helpers import scalars, writer

    from healthwatch.demo.scenario import _lead_line, _lead_over_band

    @dataclass
    class Fired:
        alert: str
        step: int
        tokens: int

    store = tmp_path / "store"
    loss = [3.0 + 0.01 * ((s * 7) % 5) for s in range(120)]
    for s in range(100, 120):
        loss[s] = 4.0  # the loss leaves its band at step 100
    scalars(writer(store, "main"), "loss/train", range(120), loss)
    out = _lead_over_band(store, "main", 60, [Fired("Late", 110, 110_000), Fired("Early", 85, 85_000)])
    assert out == {"first_rule": "Early", "band_exit": 100, "band_exit_tokens": 100_000, "lead_steps": 15,
                   "lead_tokens": 15_000}
    line = _lead_line({**out, "first_alert": 85, "stopped_at": 119})
    assert line == "first rule to fire: Early at step 85; the train loss left its band at step 100: lead 15 steps (15,000 tokens)"
    quiet = _lead_over_band(store, "main", 200, [])  # onset after the last step: no exit judged
    assert quiet["band_exit"] is None and quiet["first_rule"] is None
    assert "had not left its band" in _lead_line({**quiet, "first_alert": None, "stopped_at": 119})
