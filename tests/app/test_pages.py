"""Fast in-process checks of every page with Streamlit's AppTest on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from tests_app_store import write_run  # type: ignore[import-not-found]

VIEWS = Path(__file__).resolve().parents[2] / "app" / "views"


def _run(page: str, store: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("HEALTHWATCH_STORE", str(store))
    at = AppTest.from_file(str(VIEWS / f"{page}.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_runs_page_lists_lineage_and_health(app_store, monkeypatch):
    at = _run("runs", app_store, monkeypatch)
    df = at.dataframe[0].value
    runs = [r.strip() for r in df["run"].tolist()]
    assert runs[0] == "main" and "└ main-bf16-a" in runs and "└ main-bf16-b" in runs
    assert df["health"].tolist()[0] == "FIRING (1)"
    assert df["attempts"].tolist()[0] == 2


def test_run_page_draws_every_chart(app_store, monkeypatch):
    at = _run("run", app_store, monkeypatch)
    charts = at.get("plotly_chart")
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts]
    assert "Train loss and MTP heads" in titles and "Expert balance (MaxVio)" in titles
    assert {"maxvio by layer and step", "resid_rms by layer and step", "wgrad_norm by layer and step"} <= set(titles)
    loss = json.loads(charts[titles.index("Train loss and MTP heads")].proto.spec)
    names = {t["name"] for t in loss["data"]}
    assert {"loss/train", "loss/mtp_1", "loss/mtp_2", "loss/train (superseded)"} <= names
    ghost = next(t for t in loss["data"] if t["name"] == "loss/train (superseded)")
    assert min(ghost["x"]) == 150 and ghost["line"]["dash"] == "dot"  # attempt 1 after the rollback step


def test_empty_store_and_no_moe_messages(tmp_path, monkeypatch):
    at = _run("runs", tmp_path / "missing", monkeypatch)
    assert "No healthwatch store" in at.info[0].value
    root = tmp_path / "dense"
    write_run(root, "dense", range(0, 20), moe=False)
    at = _run("run", root, monkeypatch)
    assert any("no MoE layers" in i.value for i in at.info)


def test_alerts_and_compare_pages_render(app_store, monkeypatch):
    at = _run("alerts", app_store, monkeypatch)
    assert at.get("plotly_chart")
    _run("compare", app_store, monkeypatch)


@pytest.mark.parametrize("page", ["runs", "run", "alerts", "compare"])
def test_pages_on_empty_existing_store(tmp_path, monkeypatch, page):
    (tmp_path / "empty").mkdir()
    _run(page, tmp_path / "empty", monkeypatch)
