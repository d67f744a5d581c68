"""The demo's per-branch gap summary is a readable table, not a dataframe dump."""

from __future__ import annotations

import polars as pl
from rich.console import Console

from healthwatch.compare import SUMMARY_SCHEMA
from healthwatch.demo.summary import gap_table


def _render(df: pl.DataFrame) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(gap_table(df))
    return console.export_text()


def _row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {k: None for k in SUMMARY_SCHEMA}
    row.update(kw)
    return row


def test_rows_show_branch_point_and_gaps_in_percent() -> None:
    df = pl.DataFrame([
        _row(branch="main-bf16-s40", branch_step=40, branch_tokens=2_621_440, tokens_compared=1_310_720,
             mean_gap=0.0031, max_gap=0.0125, last_gap=-0.0002),
        _row(branch="main-bf16-s80", branch_step=80, branch_tokens=None, tokens_compared=None,
             message="no overlapping tokens with main"),
    ], schema=SUMMARY_SCHEMA)
    text = _render(df)
    lines = {line.split("│")[1].strip() if "│" in line else "": line for line in text.splitlines()}
    first = lines["main-bf16-s40"]
    # 0.0031 -> +0.310 (%), 0.0125 -> +1.250, 2,621,440 tokens -> 2.62M (computed by hand).
    for cell in ("40", "2.62M", "+0.310", "+1.250"):
        assert cell in first, (cell, first)
    second = lines["main-bf16-s80"]
    assert "n/a" in second and "unknown" in second and "no overlapping tokens" in second
    assert "None" not in text and "null" not in text and "shape:" not in text
    header = next(line for line in text.splitlines() if "from step" in line)
    assert "mean gap" in header and "max gap" in header and "from tokens" in header


def test_fits_80_columns_without_cutting_names_or_numbers() -> None:
    df = pl.DataFrame([_row(branch="ultra-nvfp4-bf16-s120", branch_step=120, branch_tokens=62_000,
                            mean_gap=-0.00068, max_gap=0.01277)], schema=SUMMARY_SCHEMA)
    console = Console(record=True, width=80, color_system=None)
    console.print(gap_table(df))
    text = console.export_text()
    assert "…" not in text
    assert "ultra-nvfp4-bf16-s120" in text and "62k" in text and "-0.068" in text and "+1.277" in text


def test_no_note_column_when_every_row_has_numbers() -> None:
    df = pl.DataFrame([_row(branch="b", branch_step=1, branch_tokens=10, tokens_compared=5, mean_gap=0.0,
                            max_gap=0.0, last_gap=0.0)], schema=SUMMARY_SCHEMA)
    text = _render(df)
    assert "note" not in text and "+0.000" in text
