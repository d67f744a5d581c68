"""Plotly figures shared by the pages: line charts with ghosted superseded rows, heatmaps, markers."""

from __future__ import annotations

import plotly.graph_objects as go
import polars as pl

X_TITLES = {"step": "step", "tokens": "tokens consumed"}


def lines(frames: dict[str, pl.DataFrame], x: str, y_title: str, title: str, log_y: bool = False,
          smooth: int = 1) -> go.Figure:
    """One trace per series; rows of superseded attempts drawn dashed and faint (evidence, not data)."""
    fig = go.Figure()
    for name, df in frames.items():
        if df.height == 0:
            continue
        for ghost in (False, True):
            part = df.filter(pl.col("superseded") == ghost) if "superseded" in df.columns else (df if not ghost else df.head(0))
            if part.height == 0:
                continue
            y = part["value"]
            if smooth > 1 and not ghost:
                y = y.rolling_mean(window_size=smooth, min_samples=1)
            fig.add_trace(go.Scattergl(
                x=part[x].to_list(), y=y.to_list(), mode="lines", name=name + (" (superseded)" if ghost else ""),
                legendgroup=name, showlegend=not ghost,
                line={"dash": "dot", "width": 1} if ghost else {"width": 1.6}, opacity=0.45 if ghost else 1.0,
            ))
    fig.update_layout(title=title, xaxis_title=X_TITLES.get(x, x), yaxis_title=y_title, height=330,
                      margin={"l": 60, "r": 20, "t": 40, "b": 45}, legend={"orientation": "h", "y": -0.25})
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def heatmap(df: pl.DataFrame, title: str, colorbar: str) -> go.Figure:
    """Layer × step heatmap from ``query.heatmap`` output."""
    wide = df.pivot(on="step", index="layer", values="value").sort("layer")
    steps = [c for c in wide.columns if c != "layer"]
    fig = go.Figure(go.Heatmap(z=wide.drop("layer").to_numpy(), x=[int(s) for s in steps], y=wide["layer"].to_list(),
                               colorscale="Viridis", colorbar={"title": colorbar}))
    fig.update_layout(title=title, xaxis_title="step (bucket start)", yaxis_title="layer", height=330,
                      margin={"l": 60, "r": 20, "t": 40, "b": 45})
    return fig


def add_markers(fig: go.Figure, events: pl.DataFrame, x: str) -> None:
    """Vertical lines for rollbacks, alerts and notes (checkpoints are too many to draw)."""
    for row in events.iter_rows(named=True):
        if row["kind"] == "checkpoint":
            continue
        color = {"rollback": "crimson", "alert": "orange"}.get(row["kind"], "gray")
        fig.add_vline(x=row[x], line={"color": color, "dash": "dash", "width": 1},
                      annotation_text=row["kind"], annotation_position="top left")
