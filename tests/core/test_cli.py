"""The core CLI commands on a real store."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from healthwatch.cli import app
from healthwatch.store import StoreWriter

sys.path.insert(0, str(Path(__file__).parent))

runner = CliRunner()


def _store(root: Path) -> None:
    w = StoreWriter(root, "cli-run")
    w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["nvfp4"],
                     "config": ["{}"], "created": [time.time()], "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [1], "start_step": [0], "started_at": [time.time()], "host": ["h"],
                         "reason": ["start"], "schema_version": ["1.0"]})
    for k in range(3):
        steps = np.arange(k * 10, (k + 1) * 10)
        w.write("scalars", {"attempt": [1] * 10, "step": steps, "tokens": steps * 100, "name": ["loss/train"] * 10,
                            "value": np.ones(10), "wall_time": np.full(10, time.time())})


def test_version():
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0 and "healthwatch 0.1.0" in res.stdout


def test_runs_and_compact(tmp_path):
    root = tmp_path / "s"
    _store(root)
    res = runner.invoke(app, ["runs", "--store", str(root)])
    assert res.exit_code == 0, res.output
    assert "cli-run" in res.stdout and "2,900" in res.stdout  # last tokens
    assert "live" in res.stdout  # rows written just now, writer not closed
    StoreWriter(root, "cli-run").write("events", {"attempt": [1], "step": [29], "tokens": [2900], "kind": ["close"],
                                                  "message": ["monitor closed"], "wall_time": [time.time()]})
    res = runner.invoke(app, ["runs", "--store", str(root)])
    assert "finished" in res.stdout and "live" not in res.stdout  # its Monitor closed: finished, not live
    res = runner.invoke(app, ["compact", "--store", str(root)])
    assert res.exit_code == 0, res.output
    assert "scalars: 3→1" in res.stdout
    assert len(list((root / "table=scalars" / "run=cli-run").glob("*.parquet"))) == 1


def test_missing_store_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HEALTHWATCH_STORE", raising=False)
    res = runner.invoke(app, ["runs", "--store", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "no healthwatch store at" in res.output and "Traceback" not in res.output


def test_env_var_selects_store(tmp_path, monkeypatch):
    root = tmp_path / "envstore"
    _store(root)
    monkeypatch.setenv("HEALTHWATCH_STORE", str(root))
    res = runner.invoke(app, ["runs"])
    assert res.exit_code == 0 and "cli-run" in res.stdout
