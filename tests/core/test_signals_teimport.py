"""``healthwatch import te-debug``: Transformer Engine precision-debug logs (written here in the
``{layer}_{gemm}_{tensor}_{stat} iteration=N value=V`` format of nvdlfw_inspect) become layer metrics."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import healthwatch as hw
from healthwatch.cli import app
from healthwatch.teimport import import_te_debug, parse_name

LINES = """\
2026-11-30 10:00:01 - INFO - decoder.layers.0.self_attention.linear_qkv_fprop_activation_underflow_pct \t iteration=000010 \t value=2.5000
2026-11-30 10:00:01 - INFO - decoder.layers.0.self_attention.linear_proj_fprop_activation_underflow_pct \t iteration=000010 \t value=7.5000
decoder.layers.0.self_attention.linear_qkv_fprop_weight_underflow_pct iteration=10 value=1.0
decoder.layers.0.self_attention.linear_qkv_fprop_weight_mse iteration=10 value=0.00002
decoder.layers.0.self_attention.linear_qkv_fprop_activation_mse iteration=10 value=0.0003
decoder.layers.0.self_attention.linear_qkv_fprop_activation_amax iteration=10 value=12.0
decoder.layers.2.mlp.experts.linear_fc1_wgrad_gradient_underflow_pct iteration=10 value=40.0
decoder.layers.2.mlp.experts.linear_fc1_wgrad_gradient_underflow_pct iteration=20 value=55.0
decoder.layers.2.mlp.experts.linear_fc1_fprop_activation_l2_norm iteration=20 value=3.0
a line that is not a statistic
embedding_weight_underflow_pct iteration=10 value=99.0
"""


def test_parse_name():
    assert parse_name("decoder.layers.3.self_attention.linear_qkv_fprop_activation_underflow_pct") == (
        "decoder.layers.3.self_attention.linear_qkv", "fprop", "act", "underflow_pct")
    assert parse_name("model.layers.1.mlp.fc2_weight_underflows%") == ("model.layers.1.mlp.fc2", None, "weight", "underflows%")
    assert parse_name("decoder.layers.1.x_wgrad_gradient_mse")[1:] == ("wgrad", "grad", "mse")
    assert parse_name("no_statistic_here") is None


def _expected(got: dict) -> None:
    # Layer 0, step 10: the worst activation underflow of its two GEMMs (7.5 %), weight 1 %.
    assert got[(10, 0, "te_underflow")] == pytest.approx(0.075)
    assert got[(10, 0, "te_underflow/act")] == pytest.approx(0.075)
    assert got[(10, 0, "te_underflow/weight")] == pytest.approx(0.01)
    assert got[(10, 0, "te_mse")] == pytest.approx(3e-4)
    assert got[(10, 0, "te_mse/weight")] == pytest.approx(2e-5)
    assert got[(10, 0, "te_amax/act")] == 12.0
    assert got[(20, 2, "te_underflow/grad")] == pytest.approx(0.55)
    assert got[(20, 2, "te_l2_norm/act")] == 3.0
    # A module outside the numbered blocks (the embedding) has no layer: skipped.
    assert not [k for k in got if k[1] not in (0, 2)]


def test_import_as_new_run_then_refuse_twice(tmp_path, store_dir):
    logdir = tmp_path / "te"
    (logdir / "nvdlfw_inspect_statistics_logs").mkdir(parents=True)
    (logdir / "nvdlfw_inspect_statistics_logs" / "nvdlfw_inspect_globalrank-0.log").write_text(LINES)
    n = import_te_debug(logdir, run="te-run", store=store_dir)
    st = hw.open_store(store_dir)
    rows = st.sql("SELECT step, layer, layer_type, metric, value FROM layer_stats WHERE run = 'te-run'").fetchall()
    assert n == len(rows)
    _expected({(s, layer, m): v for s, layer, _t, m, v in rows})
    assert {(layer, t) for _s, layer, t, _m, _v in rows} == {(0, "attention"), (2, "moe")}
    st.close()
    with pytest.raises(ValueError, match="already imported"):
        import_te_debug(logdir, run="te-run", store=store_dir)


def test_import_into_a_live_run_takes_its_tokens(tmp_path, store_dir):
    with hw.Monitor(store=store_dir, run="live") as mon:
        for step in (10, 20):
            mon.step(step, tokens=step * 1000, loss=torch.tensor(2.0))
    log = tmp_path / "rank0.log"
    log.write_text(LINES)
    result = CliRunner().invoke(app, ["import", "te-debug", str(log), "--run", "live", "--store", str(store_dir)])
    assert result.exit_code == 0, result.output
    st = hw.open_store(store_dir)
    rows = st.sql("SELECT step, tokens, layer, metric, value, attempt FROM layer_stats WHERE run = 'live'").fetchall()
    _expected({(s, layer, m): v for s, _tok, layer, m, v, _a in rows})
    assert {(s, tok) for s, tok, *_ in rows} == {(10, 10_000), (20, 20_000)}
    assert {a for *_, a in rows} == {1}
    assert st.sql("SELECT count(*) FROM runs WHERE run = 'live'").fetchone()[0] == 1


def test_bad_input_is_a_clear_error(tmp_path, store_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.log").write_text("nothing to see\n")
    result = CliRunner().invoke(app, ["import", "te-debug", str(empty), "--run", "r", "--store", str(store_dir)])
    assert result.exit_code != 0 and "no Transformer Engine statistics" in result.output
    with pytest.raises(FileNotFoundError):
        import_te_debug(tmp_path / "missing", run="r", store=store_dir)
    with pytest.raises(ValueError, match="invalid run name"):
        import_te_debug(empty, run="../x", store=store_dir)
