"""Figures and tables of the Compare page that the CLI export does not need.

The gap, loss, summary and combined figures live in :mod:`healthwatch.compare` so that the page
and ``healthwatch compare --out chart.html`` draw the same chart; this module adds the page-only
pieces: branch markers, side-by-side signals, and the summary table as shown.
"""

from __future__ import annotations

from collections.abc import Iterable

import plotly.graph_objects as go
import polars as pl

from healthwatch.compare import format_tokens

#: Signals offered side by side, best first; ``layer:`` entries are layer metrics aggregated over layers.
PREFERRED_SIGNALS = (
    "loss/mtp_2",
    "loss/mtp_1",
    "layer:maxvio",
    "layer:resid_rms",
    "layer:wgrad_norm",
    "grad_norm/total",
    "layer:dead_experts",
    "layer:resid_rms_max",
)


def signal_options(scalars: Iterable[str], layer_metrics: Iterable[str], exclude: str | None = None) -> list[str]:
    """Signal choices: preferred ones that exist first, then the other scalars and layer metrics."""
    available = [s for s in sorted(set(scalars)) if s != exclude] + [f"layer:{m}" for m in sorted(set(layer_metrics))]
    first = [s for s in PREFERRED_SIGNALS if s in available]
    return first + [s for s in available if s not in first]


def signal_label(signal: str, agg: str) -> str:
    """Human title of a signal option (``layer:maxvio`` -> ``maxvio (max over layers)``)."""
    return f"{signal.removeprefix('layer:')} ({agg} over layers)" if signal.startswith("layer:") else signal


#: Axis titles with units for the signals the pages know (others are titled with their name).
UNITS = {
    "maxvio": "MaxVio (ratio)",
    "resid_rms": "residual RMS (activation units)",
    "resid_rms_max": "max-token RMS (activation units)",
    "wgrad_norm": "weight-gradient L2 norm",
    "dead_experts": "dead experts (count)",
}


def unit_title(signal: str) -> str:
    """The y-axis title of ``signal`` with its unit (``loss/*`` in nats per token)."""
    name = signal.removeprefix("layer:")
    if name.startswith("loss/"):
        return f"{name} (nats/token)"
    if name.startswith("grad_norm/"):
        return f"{name} (L2 norm)"
    return UNITS.get(name, name)


def signal_figure(frames: dict[str, pl.DataFrame], title: str, branch_marks: dict[str, int] | None = None,
                  y_title: str | None = None) -> go.Figure:
    """One signal of several runs overlaid on the tokens axis (frames have ``tokens, value``)."""
    fig = go.Figure()
    for run, df in frames.items():
        if df.height:
            fig.add_trace(go.Scattergl(x=df["tokens"].to_list(), y=df["value"].to_list(), mode="lines", name=run,
                                       line={"width": 1.4}))
    add_branch_marks(fig, branch_marks or {})
    fig.update_layout(title=title, xaxis_title="tokens consumed", yaxis_title=y_title or "", height=320,
                      margin={"l": 60, "r": 20, "t": 40, "b": 45}, legend={"orientation": "h", "y": -0.3})
    return fig


def add_branch_marks(fig: go.Figure, marks: dict[str, int]) -> None:
    """Dotted vertical lines where each branch was cut from its parent (tokens)."""
    # One label row per branch, so labels of close branch points never overprint each other.
    for row, (name, tokens) in enumerate((n, t) for n, t in marks.items() if t is not None):
        fig.add_vline(x=tokens, line={"color": "gray", "dash": "dot", "width": 1})
        fig.add_annotation(x=tokens, xref="x", y=1.0 - 0.08 * row, yref="paper", yanchor="top", xanchor="left",
                           text=f"{name} @ {format_tokens(tokens)}", showarrow=False, font={"size": 10},
                           bgcolor="rgba(255,255,255,0.8)")


def summary_table(summary: pl.DataFrame) -> pl.DataFrame:
    """:func:`healthwatch.compare.gap_summary` as shown: gaps in percent, tokens human-readable."""
    def pct(col: str) -> pl.Expr:
        return pl.col(col).map_elements(lambda v: f"{v * 100:.3f} %", return_dtype=pl.Utf8).alias(col.replace("_gap", " gap"))

    def tok(col: str, name: str) -> pl.Expr:
        return pl.col(col).map_elements(format_tokens, return_dtype=pl.Utf8).alias(name)

    return summary.select(
        pl.col("branch"),
        (pl.col("precision_low").fill_null("?") + " vs " + pl.col("precision_ref").fill_null("?")).alias("precisions"),
        pl.col("low_run").alias("low run"),
        pl.col("ref_run").alias("reference"),
        pl.col("branch_step").alias("branch step"),
        tok("branch_tokens", "branch tokens"),
        tok("tokens_compared", "tokens compared"),
        pl.col("points"),
        pct("mean_gap"),
        pct("last_gap"),
        pct("max_gap"),
        pl.col("message").fill_null(""),
    )
