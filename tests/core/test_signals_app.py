"""The Run page's signals panel renders from a real store (Streamlit AppTest, in process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_signals_query import _store

import healthwatch.app
from healthwatch.store import StoreWriter

APP = Path(healthwatch.app.__file__).resolve().parent


def test_signals_panel(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
    _store(store_dir)
    w = StoreWriter(store_dir, "r", attempt=1)
    w.write("scalars", {"attempt": [1, 1], "step": [0, 200], "tokens": [0, 200], "name": ["loss/train"] * 2,
                        "value": [3.0, 2.0], "wall_time": [0.0, 1.0]})
    monkeypatch.setenv("HEALTHWATCH_STORE", str(store_dir))
    at = AppTest.from_file(str(APP / "views" / "run.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert "Signals: quantisation, updates, routers, Mamba" in [h.value for h in at.subheader]
    keys = [c.key for c in at.get("plotly_chart")]
    assert {"chart_sig_overview", "chart_sig_heat", "chart_sig_load"} <= set(keys)
    tables = [d.value for d in at.dataframe]
    worst = next(t for t in tables if "rise" in t.columns and len(t) and t["layer"].iloc[0] == 1)
    assert worst["value"].iloc[0] == pytest.approx(0.08)
    at.select_slider(key="sig_load_base").set_value(100).run()
    assert not at.exception
