"""``MonitorConfig``: every field documented, bad values raise naming the field (never clamped),
``Monitor(...)`` keyword shorthands and ``monitor_config=`` build the same validated config."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from pathlib import Path

import pytest

import healthwatch as hw
from healthwatch.hooks.config import MonitorConfig

BAD = [
    ("log_every", 0), ("log_every", -3), ("log_every", 1.5), ("log_every", True),
    ("expert_load_every", -1), ("expert_load_every", "10"),
    ("flush_every_s", 0), ("flush_every_s", -1.0), ("flush_every_s", math.nan), ("flush_every_s", "5"),
    ("flush_every_steps", 0), ("dead_window", 0), ("queue_size", 0),
    ("per_rank", 1), ("per_rank", "yes"), ("close_timeout_s", 0.0),
]


def test_every_field_has_its_own_docstring() -> None:
    """One string literal right after each field in the class body (what IDEs and docs show)."""
    tree = ast.parse(Path(inspect.getsourcefile(MonitorConfig)).read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "MonitorConfig")
    documented = {
        stmt.target.id
        for stmt, nxt in zip(cls.body, cls.body[1:])
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str) and nxt.value.value.strip()
    }
    assert documented == {f.name for f in dataclasses.fields(MonitorConfig)}


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_value_raises_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        MonitorConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize(("field", "value"), [b for b in BAD if b[0] != "close_timeout_s"])
def test_monitor_keyword_raises_before_anything_is_written(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        hw.Monitor(store=tmp_path / "s", run="r", **{field: value})
    assert not (tmp_path / "s").exists()


def test_keywords_override_monitor_config_and_edge_values_are_kept(tmp_path: Path) -> None:
    base = MonitorConfig(log_every=4, flush_every_steps=7, expert_load_every=0, flush_every_s=math.inf)
    with hw.Monitor(store=tmp_path / "s", run="r", monitor_config=base, flush_every_steps=3) as mon:
        cfg = mon.monitor_config
        assert (cfg.log_every, cfg.flush_every_steps, cfg.expert_load_every) == (4, 3, 0)
        assert cfg.flush_every_s == math.inf and mon.log_every == 4
        mon.flush_every_steps = 9  # settable between steps, validated
        assert mon.monitor_config.flush_every_steps == 9
        with pytest.raises(ValueError, match="flush_every_steps"):
            mon.flush_every_steps = 0
        assert mon.flush_every_steps == 9
    assert base.flush_every_steps == 7  # the caller's config is not mutated


def test_replace_rejects_unknown_fields_and_monitor_rejects_other_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flush_every"):
        MonitorConfig().replace(flush_every=3)
    with pytest.raises(ValueError, match="MonitorConfig"):
        hw.Monitor(store=tmp_path / "s", run="r", monitor_config={"log_every": 2})  # type: ignore[arg-type]
    assert hw.MonitorConfig is MonitorConfig


def test_log_every_records_exactly_every_nth_step(tmp_path: Path) -> None:
    """The knob does what its docstring says: steps 0, 3, 6, 9 of 0..10 are stored, nothing else."""
    with hw.Monitor(store=tmp_path / "s", run="r", log_every=3) as mon:
        for step in range(11):
            mon.step(step, loss=float(step))
    st = hw.open_store(tmp_path / "s")
    got = [s for (s,) in st.sql("SELECT step FROM scalars WHERE name = 'loss/train' ORDER BY step").fetchall()]
    assert got == [0, 3, 6, 9]


def test_after_flush_functions_see_the_flushed_rows_and_feed_on_alert(tmp_path: Path) -> None:
    """A plain ``f(store_root, run)`` runs in the writer thread after the rows are in the store; what
    it returns reaches ``on_alert``. (The alert engine is wired in the same way, see plugins.py.)"""
    seen: list[tuple[str, int]] = []
    heard: list[object] = []

    def count_rows(root: Path, run: str) -> list[str]:
        st = hw.open_store(root)
        try:
            n = st.sql("SELECT count(*) FROM scalars WHERE run = ? AND name = 'loss/train'", [run]).fetchone()[0]
        finally:
            st.close()
        seen.append((run, n))
        return [f"flushed {n}"]

    with hw.Monitor(store=tmp_path / "s", run="cb", flush_every_steps=2, flush_every_s=math.inf,
                    after_flush=[count_rows], on_alert=heard.append) as mon:
        for step in range(5):
            mon.step(step, loss=1.0)
    assert seen == [("cb", 2), ("cb", 4), ("cb", 5)]
    assert heard == ["flushed 2", "flushed 4", "flushed 5"]
