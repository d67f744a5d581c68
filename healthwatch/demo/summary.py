"""The demo's closing report: the per-branch precision gap as a readable table."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
from rich.table import Table


def _tokens(n: Any) -> str:
    """``1234567`` -> ``1.23M`` (what a reader compares), ``None`` -> what is missing."""
    if n is None:
        return "unknown"
    n = int(n)
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _percent(fraction: Any) -> str:
    """A gap fraction as signed percent (``0.004`` -> ``+0.400``; the column header says %)."""
    if fraction is None:
        return "n/a"
    f = float(fraction)
    if math.isnan(f):
        return "NaN"
    return f"{100 * f:+.3f}"


def gap_table(df: pl.DataFrame, title: str = "NVFP4 vs BF16 relative train-loss gap per branch") -> Table:
    """One row per branch of :func:`healthwatch.compare.gap_summary`'s frame.

    Columns: branch, branch point (step and tokens it started from), mean and max gap in percent
    of the reference loss, and why a row has no numbers when it has none.
    """
    table = Table(title=title, title_justify="left",
                  caption="from: the parent's step and tokens the branch started at; "
                          "gap = (L_nvfp4 - L_bf16) / L_bf16 on aligned tokens",
                  caption_justify="left")
    names = [str(r.get("branch") or r.get("ref_run") or "?") for r in df.iter_rows(named=True)]
    # Branch names are what a reader looks for: never truncate them, squeeze the numbers instead.
    table.add_column("branch", style="bold", no_wrap=True, min_width=max(map(len, names), default=6))
    # Five columns fit an 80-column terminal without cutting a number.
    for header in ("from step", "from tokens", "mean gap %", "max gap %"):
        table.add_column(header, justify="right")
    with_notes = "message" in df.columns and df["message"].drop_nulls().len() > 0
    if with_notes:
        table.add_column("note")
    for name, row in zip(names, df.iter_rows(named=True)):
        cells = [
            name,
            str(row["branch_step"]) if row.get("branch_step") is not None else "unknown",
            _tokens(row.get("branch_tokens")),
            _percent(row.get("mean_gap")),
            _percent(row.get("max_gap")),
        ]
        if with_notes:
            cells.append(row.get("message") or "")
        table.add_row(*cells)
    return table
