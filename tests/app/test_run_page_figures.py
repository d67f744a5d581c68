"""The Run page's Overview figures are built once per (run's files, view options) and shared by new
sessions; a new segment of the run rebuilds them with its rows."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from healthwatch.app import charts
from healthwatch.store import StoreWriter

APP = Path(__file__).resolve().parents[2] / "app"


def _load(store: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    monkeypatch.setenv("HEALTHWATCH_STORE", str(store))
    at = AppTest.from_file(str(APP / "views" / "run.py"), default_timeout=90)
    at.query_params["run"] = "main"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return {s["layout"]["title"]["text"]: s for s in specs}


def test_overview_figures_shared_until_the_run_changes(app_store: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    shutil.copytree(app_store, store)  # a store of its own: no other test shares its figures
    built: list[str] = []
    real = charts.lines

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(args[3])  # the title
        return real(*args, **kwargs)

    monkeypatch.setattr(charts, "lines", counting)
    first = _load(store, monkeypatch)
    assert len(first) == 3 and len(built) == 3
    second = _load(store, monkeypatch)  # a new session, nothing new on disk: nothing rebuilt
    assert len(built) == 3 and second == first

    time.sleep(0.01)  # a later directory mtime for the new segment
    w = StoreWriter(store, "main", attempt=2)
    w.write("scalars", {"attempt": np.array([2], dtype=np.int32), "step": np.array([10_000]),
                        "tokens": np.array([10_000_000]), "name": ["loss/train"], "value": np.array([42.5]),
                        "wall_time": np.array([time.time()])})
    third = _load(store, monkeypatch)
    assert len(built) == 6  # rebuilt from the run's new files
    loss = third["Train loss and every MTP head"]
    live = next(t for t in loss["data"] if t.get("name") == "loss/train")
    ys = live["y"]
    if isinstance(ys, dict):
        import base64

        ys = np.frombuffer(base64.b64decode(ys["bdata"]), dtype=np.dtype(ys["dtype"])).tolist()
    assert 42.5 in ys
