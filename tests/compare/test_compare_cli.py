"""`healthwatch compare --store S --runs A B … --out FILE` writes readable CSV/Parquet/HTML."""

from __future__ import annotations

import polars as pl
import pytest
from _deps import require, require_any
from typer.testing import CliRunner

from healthwatch.cli import app
from healthwatch.compare import export_comparison

runner = CliRunner()


def _compare(store, *args: str):
    return runner.invoke(app, ["compare", "--store", str(store), *args])


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_export_table(gap_store, tmp_path, suffix):
    out = tmp_path / "out" / f"cmp.{suffix}"
    res = _compare(gap_store, "--runs", "nvfp4", "--runs", "bf16-s10002", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    df = pl.read_csv(out) if suffix == "csv" else pl.read_parquet(out)
    assert df.columns == ["low_run", "ref_run", "tokens", "step_low", "step_ref", "low", "ref", "gap", "gap_smooth"]
    assert set(df["ref_run"]) == {"bf16-s10002"}
    assert f"{df['gap'].mean():.4g}" == "0.003"


def test_runs_as_one_list_or_repeated(gap_store, tmp_path):
    """`--runs A B` (README's form) and `--runs A --runs B` give the same file; order is kept."""
    one = tmp_path / "one.csv"
    rep = tmp_path / "rep.csv"
    res = _compare(gap_store, "--runs", "nvfp4", "bf16-s10002", "bf16-s5001", "--out", str(one))
    assert res.exit_code == 0, res.output
    res = _compare(gap_store, "--runs", "nvfp4", "--runs", "bf16-s10002", "--runs", "bf16-s5001", "--out", str(rep))
    assert res.exit_code == 0, res.output
    a, b = pl.read_csv(one), pl.read_csv(rep)
    assert a.equals(b) and set(a["ref_run"]) == {"bf16-s10002", "bf16-s5001"} and set(a["low_run"]) == {"nvfp4"}
    res = _compare(gap_store, "--runs", "nvfp4", "bf16-s10002", "--bogus", "--out", str(tmp_path / "x.csv"))
    assert res.exit_code != 0 and "--bogus" in res.output  # unknown options are still errors


def test_export_single_parent_compares_its_branches_and_html(gap_store, tmp_path):
    out = tmp_path / "cmp.html"
    res = _compare(gap_store, "--runs", "nvfp4", "--out", str(out), "--metric", "loss/mtp_2")
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<html>" in html[:200] and "plotly" in html.lower()
    for branch in ("bf16-s5001", "bf16-s10002", "bf16-s16002"):
        assert branch in html
    csv = export_comparison(gap_store, ["nvfp4"], tmp_path / "all.csv")
    assert pl.read_csv(csv)["ref_run"].n_unique() == 3


def test_png_with_kaleido(gap_store, tmp_path):
    require("kaleido", "plotly's PNG export (a core dependency)")
    require_any(["chromium", "google-chrome"], "a Chrome/Chromium for kaleido (apt-get install -y chromium)")
    res = _compare(gap_store, "--runs", "nvfp4", "--out", str(tmp_path / "c.png"))
    assert res.exit_code == 0, res.output
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--runs", "nvfp4", "--runs", "ghost"], "run 'ghost' is not in the store"),
        (["--runs", "bf16-s5001"], "has no branches"),
        (["--runs", "nvfp4", "--runs", "bf16-s5001", "--metric", "loss/mtp_7"], "no 'loss/mtp_7' values"),
    ],
)
def test_clear_errors(gap_store, tmp_path, args, needle):
    res = _compare(gap_store, *args, "--out", str(tmp_path / "x.csv"))
    assert res.exit_code != 0 and needle in res.output and "Traceback" not in res.output


def test_bad_suffix_no_overlap_and_missing_store(store_dir, tmp_path):
    from tests_compare_store import write_run

    write_run(store_dir, "a", range(0, 50), 1000)
    write_run(store_dir, "b", range(0, 50), 1000, token_offset=10**9)
    res = _compare(store_dir, "--runs", "a", "--runs", "b", "--out", str(tmp_path / "x.txt"))
    assert res.exit_code != 0 and ".csv, .parquet, .html, .png" in res.output
    res = _compare(store_dir, "--runs", "a", "--runs", "b", "--out", str(tmp_path / "x.csv"))
    assert res.exit_code != 0 and "no overlapping tokens" in res.output
    with pytest.raises(LookupError, match="no healthwatch store"):
        export_comparison(tmp_path / "nowhere", ["a", "b"], tmp_path / "x.csv")
