"""Fast in-process checks of every page with Streamlit's AppTest on a small real store."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "app"
PAGES = ("runs", "run", "divergence", "compare", "alerts")


def _run(page: str, store: Path, monkeypatch: pytest.MonkeyPatch, run: str | None = None,
         setup: Any = None, section: str | None = None) -> AppTest:
    monkeypatch.setenv("HEALTHWATCH_STORE", str(store))
    at = AppTest.from_file(str(APP / "views" / f"{page}.py"), default_timeout=90)
    if run is not None:
        at.query_params["run"] = run
    if section is not None:  # the Run page's open section (its tabs are bound to ?section=)
        at.query_params["section"] = section
    at.run()
    if setup is not None:
        setup(at)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _specs(at: AppTest) -> dict[str, dict]:
    """Plotly figures of the page by title."""
    out = {}
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        out[spec["layout"].get("title", {}).get("text", "")] = spec
    return out


def _arr(v: Any) -> list:
    """A plotly data array, decoding plotly's binary ``{"dtype", "bdata"}`` form."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v or [])


def _texts(at: AppTest) -> str:
    return "\n".join(e.value for kind in ("info", "warning", "success", "error", "caption", "markdown")
                     for e in getattr(at, kind))


def test_runs_page_lists_lineage_health_and_links(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _run("runs", app_store, monkeypatch)
    df = at.dataframe[0].value
    assert [r.strip() for r in df["lineage"]] == ["main", "└─ main-bf16", "dense", "fresh"]
    health = dict(zip([r.strip("└─ ") for r in df["lineage"]], df["health"]))
    assert health["main"] == "FIRING (1): MaxVioHigh" and health["dense"] == "ok"
    assert df["attempts"].tolist()[0] == 2 and "run?run=main" in df["open"].tolist()
    assert "Lineage on the tokens axis" in next(iter(_specs(at)))


def test_run_page_draws_every_signal(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _run("run", app_store, monkeypatch, run="main")
    specs = _specs(at)
    # A first load draws the Overview section only: the other sections are neither queried nor sent.
    assert set(specs) == {"Train loss and every MTP head", "Gradient norms: total, output, embedding, MTP",
                          "Expert balance: MaxVio over MoE layers"}
    assert [t.label for t in at.tabs] == ["Overview", "Layers", "At steps", "Signals"]
    loss = specs["Train loss and every MTP head"]
    names = {t.get("name") for t in loss["data"]}
    assert {"loss/train", "loss/mtp_1", "loss/mtp_2", "loss/train (superseded)"} <= names
    ghost = next(t for t in loss["data"] if t.get("name") == "loss/train (superseded)")
    assert min(_arr(ghost["x"])) == 100 and ghost["line"]["dash"] == "dot"  # attempt 1 after the rollback step
    live = next(t for t in loss["data"] if t.get("name") == "loss/train")
    assert len(_arr(live["x"])) == 300  # small runs are drawn exactly
    # Event and alert markers: vertical lines (one line trace per kind on the hidden 0..1 overlay axis,
    # not layout shapes), the rollback among them, at the rollback's step.
    rollback = next(t for t in loss["data"] if t.get("name") == "rollback")
    assert rollback["line"]["color"] == "#d62728" and rollback["yaxis"] == "y9" and rollback["mode"] == "lines"
    events = next(t for t in loss["data"] if t.get("name") == "events")
    assert _arr(rollback["y"])[:2] == [0.0, 1.0] and _arr(rollback["x"])[0] in _arr(events["x"])
    assert not loss["layout"].get("shapes")
    assert loss["layout"]["yaxis9"]["range"] == [0, 1] and loss["layout"]["yaxis9"]["visible"] is False
    assert "events" in names
    assert loss["layout"]["yaxis"]["title"]["text"] == "cross-entropy (nats per token)"
    assert "2 attempts, 1 rolled back" in _texts(at) and "1 alert firing" in _texts(at)

    layers = _specs(_run("run", app_store, monkeypatch, run="main", section="Layers"))
    assert set(layers) == {"MaxVio by layer and step", "Dead experts (no tokens over the trailing window)",
                           "Residual RMS by layer and step", "Weight-gradient norm by layer and step"}
    for title in ("MaxVio by layer and step", "Residual RMS by layer and step"):
        hm = layers[title]
        assert hm["layout"]["xaxis"]["title"]["text"].startswith("training step")
        assert hm["layout"]["yaxis"]["title"]["text"].startswith("layer index")
    at_steps = _specs(_run("run", app_store, monkeypatch, run="main", section="At steps"))
    assert "Residual RMS per layer at chosen steps" in at_steps
    assert any(t.startswith("Expert load, layer 1") for t in at_steps) and len(at_steps) == 2


def test_run_page_section_switch_reruns_into_the_opened_tab(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Switching sections in a session (the tabs' state) draws the opened section and drops the other."""
    at = _run("run", app_store, monkeypatch, run="main")
    assert "MaxVio by layer and step" not in _specs(at)
    at.session_state["section"] = "Layers"
    at.run()
    assert not at.exception
    specs = _specs(at)
    assert "MaxVio by layer and step" in specs and "Train loss and every MTP head" not in specs


def test_run_page_other_scalars_drawn_only_when_asked(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _run("run", app_store, monkeypatch, run="main")
    assert "lr" not in _specs(at)
    at = _run("run", app_store, monkeypatch, run="main", setup=lambda a: a.toggle(key="show_other").set_value(True))
    spec = _specs(at)["lr"]
    assert spec["layout"]["yaxis"]["title"]["text"] == "lr" and len(_arr(spec["data"][0]["x"])) == 300


def test_run_page_tokens_axis_log_scale_and_smoothing(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def setup(at: AppTest) -> None:
        at.radio(key="x_axis").set_value("tokens")
        at.toggle(key="log_y").set_value(True)
        at.slider(key="smooth").set_value(0.6)

    at = _run("run", app_store, monkeypatch, run="main", setup=setup)
    loss = _specs(at)["Train loss and every MTP head"]
    assert loss["layout"]["xaxis"]["title"]["text"] == "tokens consumed"
    assert loss["layout"]["yaxis"]["type"] == "log"
    raw = next(t for t in loss["data"] if t.get("name") == "loss/train (raw)")
    assert raw["opacity"] < 0.5  # raw points stay visible behind the smoothed line
    assert max(_arr(raw["x"])) == 299 * 512
    # The Layers heatmaps on the tokens axis: bucket starts mapped through the loss's (step, tokens).
    by_step = _specs(_run("run", app_store, monkeypatch, run="main", section="Layers"))["Residual RMS by layer and step"]
    by_tok = _specs(_run("run", app_store, monkeypatch, run="main", section="Layers", setup=setup))[
        "Residual RMS by layer and step"]
    assert by_tok["layout"]["xaxis"]["title"]["text"] == "tokens consumed (bucket start)"
    assert _arr(by_tok["data"][0]["x"]) == [s * 512 for s in _arr(by_step["data"][0]["x"])]


def test_run_page_empty_states(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _run("run", app_store, monkeypatch, run="dense")
    assert "no MoE layers" in _texts(dense)
    assert "Expert balance: MaxVio over MoE layers" not in _specs(dense)
    dense = _run("run", app_store, monkeypatch, run="dense", section="Layers")
    assert "Residual RMS by layer and step" in _specs(dense) and "no MoE layers" in _texts(dense)
    fresh = _run("run", app_store, monkeypatch, run="fresh")
    assert "is in its first step" in _texts(fresh)


def test_divergence_page_finds_the_first_mover(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _run("divergence", app_store, monkeypatch, run="main")
    text = _texts(at)
    assert "resid_rms mean, first quarter" in at.warning[0].value and "before the train loss" in at.warning[0].value
    assert "checkpoint at **step 100**" in text
    table = at.dataframe[0].value
    order = table["signal"].tolist()
    assert order.index("loss/mtp_2") < order.index("loss/train")  # the 2nd MTP head led the train loss
    assert (table["lead over train loss (steps)"].iloc[0]) > 0
    spec = next(iter(_specs(at).values()))
    assert "robust z-score" in spec["layout"]["title"]["text"]
    quiet = _run("divergence", app_store, monkeypatch, run="dense")
    assert "No signal left" in _texts(quiet) or quiet.dataframe


def test_alerts_page_timeline_states_and_rules(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _run("alerts", app_store, monkeypatch)
    spec = _specs(at)["Alert timeline: pending and firing spans per alert instance"]
    states = {t.get("name") for t in spec["data"]}
    assert {"pending", "firing", "resolved"} <= states
    cur = at.dataframe[0].value
    assert cur.iloc[0]["alert"] == "MaxVioHigh" and cur.iloc[0]["state"] == "firing"
    assert "Active rules (default pack)" in [s.value for s in at.subheader]


def test_navigation_has_every_page(app_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHWATCH_STORE", str(app_store))
    at = AppTest.from_file(str(APP / "main.py"), default_timeout=90).run()
    assert not at.exception
    assert at.title[0].value == "Runs"
    for page in ("run", "divergence", "alerts"):
        at.switch_page(str(APP / "views" / f"{page}.py")).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert at.title[0].value.lower() == page


@pytest.mark.parametrize("page", PAGES)
def test_pages_on_missing_and_empty_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: str) -> None:
    at = _run(page, tmp_path / "missing", monkeypatch)
    assert "No healthwatch store" in _texts(at)
    (tmp_path / "empty").mkdir()
    at = _run(page, tmp_path / "empty", monkeypatch)
    assert "Traceback" not in _texts(at)
