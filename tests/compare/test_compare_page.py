"""The Compare page in Streamlit's AppTest on real stores: charts, summary, exports and messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from tests_compare_store import write_run

PAGE = Path(__file__).resolve().parents[2] / "app" / "views" / "compare.py"


def _run(store: Path, monkeypatch, **widgets) -> AppTest:
    monkeypatch.setenv("HEALTHWATCH_STORE", str(store))
    at = AppTest.from_file(str(PAGE), default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    if widgets:  # set them all, then one rerun (each rerun costs a few seconds on 2 cores)
        for key, value in widgets.items():
            _widget(at, key).set_value(value)
        at = at.run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def _widget(at: AppTest, key: str):
    for kind in ("radio", "selectbox", "multiselect", "toggle", "number_input"):
        for w in getattr(at, kind):
            if w.key == key:
                return w
    raise KeyError(key)


def _charts(at: AppTest) -> dict[str, dict]:
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return {s["layout"]["title"]["text"]: s for s in specs}


def test_parent_and_branches_render_every_chart(gap_store, monkeypatch):
    at = _run(gap_store, monkeypatch)
    charts = _charts(at)
    gap_title = next(t for t in charts if t.startswith("Relative gap"))
    assert {"loss/train on tokens", "Mean relative gap per branch", "loss/mtp_2",
            "maxvio (max over layers)"} <= set(charts)
    loss = charts["loss/train on tokens"]
    assert [t["name"] for t in loss["data"]] == ["nvfp4", "bf16-s5001", "bf16-s10002", "bf16-s16002"]
    assert loss["layout"]["xaxis"]["title"]["text"] == "tokens consumed"
    gap = charts[gap_title]
    assert len(gap["data"]) == 3
    assert {0.4, 1.0} <= {round(abs(s["y0"]), 3) for s in gap["layout"]["shapes"] if "y0" in s}
    bars = charts["Mean relative gap per branch"]["data"][0]
    assert [round(v, 6) for v in bars["y"]] == [0.2, 0.3, 0.35]
    summary = next(d.value for d in at.dataframe if "mean gap" in d.value.columns)
    assert summary["mean gap"].tolist() == ["0.200 %", "0.300 %", "0.350 %"]
    assert summary["precisions"].tolist() == ["nvfp4 vs bf16"] * 3
    assert len(at.get("download_button")) >= 3  # CSV, Parquet, HTML (+ PNG with kaleido)
    lineage = at.dataframe[0].value
    assert lineage["run"].str.strip().tolist() == ["nvfp4", "└ bf16-s5001", "└ bf16-s10002", "└ bf16-s16002"]


def test_smoothing_and_signals(gap_store, monkeypatch):
    at = _run(gap_store, monkeypatch, cmp_smooth="EMA", cmp_unit="tokens", cmp_span=1e6,
              cmp_signals=["layer:resid_rms", "loss/mtp_2"], cmp_agg="median")
    charts = _charts(at)
    gap = next(v for t, v in charts.items() if t.startswith("Relative gap"))
    assert len(gap["data"]) == 6  # faint raw + smoothed per branch
    assert "resid_rms (median over layers)" in charts


def test_branch_with_missing_parent(store_dir, monkeypatch):
    write_run(store_dir, "main", range(0, 300, 3), 2048)
    write_run(store_dir, "main-b", range(150, 300, 7), 1000, precision="bf16", parent="main", branch_step=150,
              branch_tokens=150 * 2048, token_offset=150 * 2048, step0=150)
    write_run(store_dir, "orphan", range(0, 100, 7), 1000, precision="bf16", parent="gone", branch_step=10,
              branch_tokens=10_000)
    at = _run(store_dir, monkeypatch)
    assert _widget(at, "cmp_parent").value == "main"
    assert any("names parent **gone**" in c.value for c in at.caption)
    assert not at.warning
    at = _run(store_dir, monkeypatch, cmp_parent="gone")
    assert any("parent 'gone' of branch 'orphan' is missing from the store" in w.value for w in at.warning)


def test_no_overlap_and_any_runs(store_dir, monkeypatch):
    write_run(store_dir, "a", range(0, 50), 1000)
    write_run(store_dir, "b", range(0, 50), 1000, token_offset=10**9)
    at = _run(store_dir, monkeypatch)
    assert _widget(at, "cmp_mode").value == "Any runs"  # nothing has branches
    assert any("Pick a low-precision run" in i.value for i in at.info)
    at = _run(store_dir, monkeypatch, cmp_refs=["b"])
    assert any("no overlapping tokens" in w.value for w in at.warning)
    assert any("Nothing to compare" in i.value for i in at.info)
    assert "loss/train on tokens" in _charts(at)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_empty_or_missing_store(tmp_path, monkeypatch, kind):
    root = tmp_path / "store"
    if kind == "empty":
        root.mkdir()
    at = _run(root, monkeypatch)
    text = " ".join(i.value for i in at.info)
    assert ("no runs yet" in text) if kind == "empty" else ("No healthwatch store" in text)
