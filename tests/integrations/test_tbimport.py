"""TensorBoard import: Megatron-style event files written by torch's SummaryWriter become a run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _deps import require

require("tensorboard", "TensorBoard event files (in the [dev] extra)")

from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import healthwatch as hw  # noqa: E402
from healthwatch.cli import app  # noqa: E402
from healthwatch.tbimport import classify_tag, import_tensorboard, sanitize  # noqa: E402

SEQ, GBS = 128, 4  # tokens per sample, samples per iteration


def write_megatron_logdir(logdir: Path, steps: int = 6, with_args: bool = True) -> None:
    """Tags as Megatron's training_log writes them, plus per-layer health tags of various spellings."""
    w = SummaryWriter(str(logdir))
    if with_args:  # what --log-args-to-tensorboard writes
        w.add_text("seq_length", str(SEQ), 0)
        w.add_text("hybrid_override_pattern", "ME*E", 0)
    for it in range(1, steps + 1):
        samples = it * GBS
        loss = 5.0 - 0.1 * it
        w.add_scalar("learning-rate", 1e-4 * it, it)
        w.add_scalar("learning-rate vs samples", 1e-4 * it, samples)
        w.add_scalar("lm loss", loss, it)
        w.add_scalar("lm loss vs samples", loss, samples)
        w.add_scalar("mtp_1 loss", loss + 0.2, it)
        w.add_scalar("mtp_2 loss", loss + 0.4 if it != 4 else float("nan"), it)
        w.add_scalar("grad-norm", 1.0 + it, it)
        w.add_scalar("loss-scale", 1.0, it)
        w.add_scalar("moe/load_balancing_loss_layer_1", 0.01 * it, it)
        w.add_scalar("layer_3/maxvio", 0.5 * it, it)
        w.add_scalar("moe/layer_1_maxvio", 0.25 * it, it)
        w.add_scalar("dead_experts/layer_1", 0.0, it)
        w.add_scalar("resid_norm/layer_0", 10.0 + it, it)
        w.add_scalar("layer_2/resid_norm", 20.0 + it, it)
        w.add_scalar("wgrad_norm/layer_2", 0.1 * it, it)
        if it % 3 == 0:
            w.add_scalar("lm loss validation", loss + 0.05, it)
    w.close()


def test_megatron_tags_become_a_run(tmp_path: Path) -> None:
    logdir, store_dir = tmp_path / "tb", tmp_path / "store"
    write_megatron_logdir(logdir)
    n = import_tensorboard(logdir, run="old-run", store=store_dir)
    store = hw.open_store(store_dir)
    sc = store.sql("SELECT step, tokens, name, value FROM scalars WHERE run = 'old-run'").pl()
    assert n == len(sc) + store.sql("SELECT count(*) FROM layer_stats").fetchone()[0]
    names = set(sc["name"])
    assert {"loss/train", "loss/mtp_1", "loss/mtp_2", "grad_norm/total", "lr", "loss/val", "loss-scale",
            "moe/load_balancing_loss_layer_1"} <= names
    assert not any("vs_samples" in x or "vs samples" in x for x in names)
    by = {(r["name"], r["step"]): (r["tokens"], r["value"]) for r in sc.iter_rows(named=True)}
    # tokens = consumed samples × seq_length, paired from the "vs samples" tags and the seq_length arg.
    assert by[("loss/train", 3)] == (3 * GBS * SEQ, pytest.approx(4.7))
    assert by[("loss/val", 3)][0] == 3 * GBS * SEQ
    assert by[("grad_norm/total", 6)][1] == pytest.approx(7.0)
    assert by[("lr", 2)][1] == pytest.approx(2e-4)
    assert math.isnan(by[("loss/mtp_2", 4)][1])  # NaN kept, not dropped

    ls = store.sql("SELECT step, layer, layer_type, metric, value FROM layer_stats WHERE run = 'old-run'").pl()
    got = {(r["metric"], r["layer"], r["step"]): r["value"] for r in ls.iter_rows(named=True)}
    assert got[("maxvio", 3, 2)] == pytest.approx(1.0)
    assert got[("maxvio", 1, 4)] == pytest.approx(1.0)
    assert got[("dead_experts", 1, 5)] == 0.0
    assert got[("resid_rms", 0, 1)] == pytest.approx(11.0)
    assert got[("resid_rms", 2, 1)] == pytest.approx(21.0)
    assert got[("wgrad_norm", 2, 5)] == pytest.approx(0.5)
    # Types: expert metrics → moe; the rest from hybrid_override_pattern "ME*E".
    assert dict(set(zip(ls["layer"], ls["layer_type"]))) == {0: "mamba", 1: "moe", 2: "attention", 3: "moe"}

    runs = store.sql("SELECT run, precision FROM runs").fetchall()
    assert ("old-run", "unknown") in runs
    assert store.sql("SELECT reason, start_step FROM attempts WHERE run = 'old-run'").fetchall() == [("import", 1)]
    store.close()


def test_tokens_tag_wins_and_step_is_the_fallback(tmp_path: Path) -> None:
    logdir, store_dir = tmp_path / "tb", tmp_path / "store"
    w = SummaryWriter(str(logdir / "sub"))  # event files in a subdirectory are found too
    for it in range(3):
        w.add_scalar("consumed-tokens", 1000 * (it + 1), it)
        w.add_scalar("train/loss", 2.0, it)
    w.close()
    import_tensorboard(logdir, run="tok", store=store_dir)
    no_tokens = tmp_path / "tb2"
    write_megatron_logdir(no_tokens, steps=2, with_args=False)  # no seq_length → tokens = step
    import_tensorboard(no_tokens, run="steps", store=store_dir, layer_pattern="M-*E")
    store = hw.open_store(store_dir)
    rows = store.sql("SELECT run, step, tokens FROM scalars WHERE name = 'loss/train' ORDER BY run, step").fetchall()
    assert rows == [("steps", 1, 1), ("steps", 2, 2), ("tok", 0, 1000), ("tok", 1, 2000), ("tok", 2, 3000)]
    assert store.sql("SELECT count(*) FROM scalars WHERE name LIKE '%tokens%'").fetchone()[0] == 0
    types = dict(store.sql("SELECT DISTINCT layer, layer_type FROM layer_stats WHERE run = 'steps'").fetchall())
    assert types == {0: "mamba", 1: "moe", 2: "attention", 3: "moe"}
    store.close()


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_tensorboard(tmp_path / "missing", run="x", store=store_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no TensorBoard event files"):
        import_tensorboard(tmp_path / "empty", run="x", store=store_dir)
    logdir = tmp_path / "tb"
    write_megatron_logdir(logdir, steps=1)
    with pytest.raises(ValueError, match="invalid run name"):
        import_tensorboard(logdir, run="../escape", store=store_dir)
    import_tensorboard(logdir, run="once", store=store_dir)
    with pytest.raises(ValueError, match="already exists"):
        import_tensorboard(logdir, run="once", store=store_dir)


def test_cli_import(tmp_path: Path) -> None:
    logdir, store_dir = tmp_path / "tb", tmp_path / "store"
    write_megatron_logdir(logdir, steps=3)
    runner = CliRunner()
    res = runner.invoke(app, ["import", "tensorboard", str(logdir), "--run", "cli-run", "--store", str(store_dir)])
    assert res.exit_code == 0, res.output
    assert "imported" in res.output and "cli-run" in res.output
    res = runner.invoke(app, ["runs", "--store", str(store_dir)])
    assert res.exit_code == 0 and "cli-run" in res.output
    res = runner.invoke(app, ["import", "tensorboard", str(tmp_path / "nope"), "--run", "r", "--store", str(store_dir)])
    assert res.exit_code != 0 and "does not exist" in res.output


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("lm loss", ("scalar", "loss/train")),
        ("mtp_3 loss", ("scalar", "loss/mtp_3")),
        ("mtp/loss_2", ("scalar", "loss/mtp_2")),
        ("grad-norm", ("scalar", "grad_norm/total")),
        ("learning-rate", ("scalar", "lr")),
        ("lm loss vs samples", ("skip", None)),
        ("consumed-tokens", ("tokens", None)),
        ("layer_3/maxvio", ("layer", (3, "maxvio"))),
        ("moe/layer_3_maxvio", ("layer", (3, "maxvio"))),
        ("maxvio/layers/12", ("layer", (12, "maxvio"))),
        ("resid_norm/layer_5", ("layer", (5, "resid_rms"))),
        ("layer5/resid_norm_max", ("layer", (5, "resid_rms_max"))),
        ("grad-norm/layer_2", ("layer", (2, "wgrad_norm"))),
        ("moe/load_balancing_loss_layer_0", ("scalar", "moe/load_balancing_loss_layer_0")),
        ("player_1/score", ("scalar", "player_1/score")),
        ("throughput (tokens/s)", ("scalar", "throughput_tokens/s")),
    ],
)
def test_tag_classification(tag: str, expected: tuple) -> None:
    assert classify_tag(tag) == expected


def test_sanitize_makes_valid_names() -> None:
    from healthwatch.schema import validate_metric_name

    for tag in ("a b", "x..y", "  ", "ünïcode/tag", "q" * 300, "iteration-time"):
        validate_metric_name(sanitize(tag))
