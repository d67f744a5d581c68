"""`healthwatch demo --quick --no-app` builds the store the app and the alerts are shown on."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import healthwatch as hw
from healthwatch.cli import app


@pytest.mark.slow
def test_quick_demo_store_contents(tmp_path):
    store = tmp_path / "demo-store"
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
