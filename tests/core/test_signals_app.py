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
    at.query_params["section"] = "Signals"  # the Run page's Signals tab (only the open tab is drawn)
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


def _array(v: object) -> list:
    """A plotly data array, decoding plotly's binary ``{"dtype", "bdata"}`` form."""
    import base64

    import numpy as np

    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v or [])


def test_worst_layers_link_to_their_history(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worst-layers row links to ?run=&signal=&layer=; opening it preselects the signal and draws
    that one layer's whole history (values from the rows written, not from the page)."""
    AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
    _store(store_dir)
    monkeypatch.setenv("HEALTHWATCH_STORE", str(store_dir))
    at = AppTest.from_file(str(APP / "views" / "run.py"), default_timeout=120)
    at.query_params["section"] = "Signals"  # the Run page's Signals tab (only the open tab is drawn)
    at.run()
    assert not at.exception
    worst = next(d.value for d in at.dataframe if "history" in d.value.columns and "rise" in d.value.columns)
    assert list(worst["history"]) == [f"?run=r&signal=fp4_saturation&layer={int(v)}" for v in worst["layer"]]
    assert "chart_sig_layer" not in [c.key for c in at.get("plotly_chart")]   # no link opened yet

    at = AppTest.from_file(str(APP / "views" / "run.py"), default_timeout=120)
    at.query_params["run"] = "r"
    at.query_params["signal"] = "fp4_saturation"
    at.query_params["layer"] = "1"
    at.run()
    assert not at.exception
    assert at.selectbox(key="sig_metric").value == "fp4_saturation"
    chart = next(c for c in at.get("plotly_chart") if c.key == "chart_sig_layer")
    import json

    spec = json.loads(chart.proto.spec)
    ys = [y for trace in spec["data"] for y in _array(trace.get("y")) if y is not None]
    # Layer 1 was written as 0.02 + 0.0003 * step for steps 0..200: its history spans 0.02 .. 0.08.
    assert min(ys) == pytest.approx(0.02) and max(ys) == pytest.approx(0.08)
