"""Plotly figures shared by the pages.

Conventions: every axis is titled with its unit; the token axis uses SI suffixes (``1.2T``);
superseded rows (the diverged path before a rollback) are drawn dotted and faint, never hidden;
``uirevision`` is set so that a live refresh keeps the user's zoom; legends sit in a horizontal
row under the x-axis title (plotly grows the bottom margin to fit them), so they never cover the
data or the chart title, whatever the number of traces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import polars as pl

X_TITLES = {"step": "training step", "tokens": "tokens consumed"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MARKER_STYLE = {  # kind -> (colour, dash, width)
    "rollback": ("#d62728", "dash", 1.6),
    "alert firing": ("#ff7f0e", "dot", 1.4),
    "alert resolved": ("#2ca02c", "dot", 1.0),
    "checkpoint": ("#9e9e9e", "dot", 0.8),
    "note": ("#1f77b4", "dashdot", 1.0),
}
#: Draw at most this many vertical marker lines per chart (checkpoints are thinned first).
MAX_MARKERS = 60


def base_layout(fig: go.Figure, title: str, x_title: str, y_title: str, height: int = 380,
                x: str = "step", revision: str | None = None) -> go.Figure:
    """Shared layout: titles with units, legend under the x-axis title, margins that never clip labels."""
    # The title sits just above the plot area, under the mode bar (which occupies the top ~30 px);
    # the bottom margin already holds the axis title and two legend rows, so plotly rarely needs to
    # grow it (growing it shrinks the plot and would pull a paper-anchored legend up).
    top, bottom = 64, 100
    fig.update_layout(
        title={"text": title, "x": 0.0, "xanchor": "left", "font": {"size": 15}, "yref": "paper", "y": 1.0,
               "yanchor": "bottom", "pad": {"b": 8}},
        height=height,
        margin={"l": 70, "r": 20, "t": top, "b": bottom},
        legend={"orientation": "h", "yanchor": "top", "y": legend_y(height, top, bottom), "xanchor": "left",
                "x": 0.0, "font": {"size": 11}},
        hovermode="x unified",
        uirevision=revision or title,
        # No `template=`: building a plotly template object costs ~0.1 s per figure, and
        # st.plotly_chart applies Streamlit's own theme in the browser anyway.
        plot_bgcolor="white",
        # Axes in the same call: every update_* call re-validates the layout (~10 ms each).
        xaxis={"title": {"text": x_title}, "showgrid": True, "zeroline": False,
               **({"tickformat": "~s"} if x == "tokens" else {})},
        yaxis={"title": {"text": y_title}, "showgrid": True, "zeroline": False},
    )
    return fig


#: Pixels between the bottom of the plot area and the top of the legend: room for the tick labels
#: and the x-axis title.
LEGEND_GAP_PX = 60


def legend_y(height: int, top: int, bottom: int) -> float:
    """Legend ``y`` (paper units, negative = below the plot) that puts it under the x-axis title."""
    return -LEGEND_GAP_PX / max(60, height - top - bottom)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average (``weight`` in [0, 1)); NaN-aware:
    a non-finite value is passed through (it must stay visible) and does not poison the average."""
    if weight <= 0 or values.size == 0:
        return values
    out = np.empty_like(values, dtype=np.float64)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            out[i] = v
            continue
        acc = acc * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out[i] = acc / norm
    return out


def lines(frames: Mapping[str, pl.DataFrame], x: str, y_title: str, title: str, log_y: bool = False,
          smooth: float = 0.0, height: int = 380, revision: str | None = None) -> go.Figure:
    """One trace per named frame ``(step, tokens, value[, superseded])``.

    Rows flagged ``superseded`` become a dotted, faint companion trace. With ``smooth`` > 0 the
    raw points stay as a faint trace behind the smoothed line (a spike is never smoothed away).
    """
    fig = go.Figure()
    ghosts = False
    for i, (name, df) in enumerate(frames.items()):
        if df.height == 0:
            continue
        color = PALETTE[i % len(PALETTE)]
        for ghost in (False, True):
            part = df.filter(pl.col("superseded") == ghost) if "superseded" in df.columns else (
                df if not ghost else df.head(0))
            if part.height == 0:
                continue
            xs = part[x].to_numpy()
            ys = part["value"].to_numpy().astype(np.float64)
            mode = "lines" if part.height > 30 else "lines+markers"
            label = name + (" (superseded)" if ghost else "")
            if ghost:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=label, legendgroup=name, opacity=0.45,
                                           line={"color": color, "dash": "dot", "width": 1.2},
                                           marker={"size": 4}, showlegend=False))
                ghosts = True
                continue
            if smooth > 0:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=name + " (raw)", legendgroup=name,
                                           showlegend=False, opacity=0.25, line={"color": color, "width": 1},
                                           marker={"size": 3}, hoverinfo="skip"))
                ys = ema(ys, smooth)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=label, legendgroup=name,
                                       line={"color": color, "width": 1.7}, marker={"size": 4}))
    if ghosts:  # one legend entry explains every dotted companion trace
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="superseded by a rollback (dotted)",
                                 line={"color": "#7f7f7f", "dash": "dot", "width": 1.2}, hoverinfo="skip"))
    base_layout(fig, title, X_TITLES.get(x, x), y_title, height, x, revision)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def add_markers(fig: go.Figure, marks: pl.DataFrame, x: str, kinds: Sequence[str] | None = None) -> None:
    """Vertical lines for events and alert transitions, with hover labels.

    The lines are drawn as one line trace per style (kind, and faint when superseded), each holding
    all of that style's lines as ``None``-separated segments, on a hidden overlay axis spanning the
    plot's height (``y9``, range 0..1); hovering is served by an invisible-axis marker trace at the
    top of each line. Not layout shapes: plotly draws and re-lays-out every shape as an SVG element of
    its own on each draw (52 checkpoint lines on a loss chart), a trace is one path. Checkpoints are
    thinned to keep at most :data:`MAX_MARKERS` lines.
    """
    if marks.height == 0:
        return
    if kinds is not None:
        marks = marks.filter(pl.col("kind").is_in(list(kinds)))
    if marks.height == 0:
        return
    other = marks.filter(pl.col("kind") != "checkpoint")
    ck = marks.filter(pl.col("kind") == "checkpoint")
    room = max(0, MAX_MARKERS - other.height)
    if ck.height > room:
        ck = ck.gather_every(max(1, math.ceil(ck.height / max(1, room)))) if room else ck.head(0)
    marks = pl.concat([other, ck]).sort("step")
    hx, hy, htext, hcolor = [], [], [], []
    lines_by_style: dict[tuple[str, bool], list[Any]] = {}
    for row in marks.iter_rows(named=True):
        xv = row[x]
        if xv is None:
            continue
        color = MARKER_STYLE.get(row["kind"], ("#607d8b", "dashdot", 1.0))[0]
        lines_by_style.setdefault((row["kind"], bool(row.get("superseded"))), []).extend((xv, xv, None))
        hx.append(xv)
        hy.append(0.97)
        htext.append(f"{row['kind']} at step {row['step']:,}" + (f": {row['label']}" if row["label"] else "")
                     + (" (superseded)" if row.get("superseded") else ""))
        hcolor.append(color)
    fig.update_layout(yaxis9={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True})
    traces = []
    for (kind, ghost), xs in lines_by_style.items():
        color, dash, width = MARKER_STYLE.get(kind, ("#607d8b", "dashdot", 1.0))
        traces.append(go.Scatter(x=xs, y=[0.0, 1.0, None] * (len(xs) // 3), yaxis="y9", mode="lines",
                                 name=kind, showlegend=False, hoverinfo="skip", connectgaps=False,
                                 opacity=0.35 if ghost else 0.9, line={"color": color, "dash": dash, "width": width}))
    traces.append(go.Scatter(x=hx, y=hy, yaxis="y9", mode="markers", name="events",
                             marker={"symbol": "triangle-down", "size": 8, "color": hcolor},
                             text=htext, hovertemplate="%{text}<extra></extra>", showlegend=False))
    fig.add_traces(traces)


def step_to_tokens(steps: Sequence[float] | np.ndarray, ref: pl.DataFrame) -> np.ndarray:
    """Map steps to tokens by interpolating a reference ``(step, tokens)`` frame (e.g. a loss series)."""
    s = np.asarray(steps, dtype=np.float64)
    if ref.height == 0:
        return s
    r = ref.select("step", "tokens").drop_nulls().unique("step").sort("step")
    if r.height == 0:
        return s
    return np.interp(s, r["step"].to_numpy().astype(np.float64), r["tokens"].to_numpy().astype(np.float64))


def heatmap(df: pl.DataFrame, title: str, colorbar: str, x: str = "step", ref: pl.DataFrame | None = None,
            log_color: bool = False, height: int = 380, revision: str | None = None) -> go.Figure:
    """Layer x step heatmap from a ``(layer, layer_type, step, value)`` frame (bucketed in SQL)."""
    wide = df.pivot(on="step", index="layer", values="value", aggregate_function="first").sort("layer")
    steps = np.array([int(c) for c in wide.columns if c != "layer"], dtype=np.int64)
    order = np.argsort(steps)
    z = wide.drop("layer").to_numpy()[:, order].astype(np.float64)
    steps = steps[order]
    layers = wide["layer"].to_list()
    types = dict(zip(*df.select("layer", "layer_type").unique("layer").to_dict(as_series=False).values()))
    label = colorbar
    if log_color:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)
        label = f"log10 {colorbar}"
    xs = step_to_tokens(steps, ref) if (x == "tokens" and ref is not None) else steps
    # No per-cell customdata (the layer type of each cell): for 108 layers x 240 buckets it cost
    # ~0.1 s of JSON per heatmap and 40 % more bytes. The type is in the y-axis hover label instead
    # (``y`` carries "index · type" categories drawn in layer order).
    # float32 halves the bytes sent to the browser (a colour needs no more precision).
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), x=xs, y=[f"{layer} · {types.get(layer, '')}" for layer in layers], colorscale="Viridis",
        colorbar={"title": {"text": label, "side": "right"}, "thickness": 14},
        hovertemplate=("layer %{y}<br>" + ("tokens %{x:.3s}" if x == "tokens" else "step %{x:,}")
                       + "<br>value %{z:.4g}<extra></extra>"),
    ))
    base_layout(fig, title, X_TITLES.get(x, x) + " (bucket start)", "layer index (0 = first block)", height, x,
                revision)
    fig.update_layout(hovermode="closest")
    # Categorical rows in layer order; label about a dozen of them with the bare index.
    step_lbl = max(1, math.ceil(len(layers) / 12))
    names = [f"{layer} · {types.get(layer, '')}" for layer in layers]
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=names, showgrid=False,
                     tickvals=names[::step_lbl], ticktext=[str(layer) for layer in layers[::step_lbl]])
    return fig


def profile(df: pl.DataFrame, title: str, y_title: str, x: str = "step", log_y: bool = False,
            height: int = 380) -> go.Figure:
    """Per-layer profile lines, one per chosen step, from ``(asked, step, tokens, layer, layer_type, value)``."""
    fig = go.Figure()
    for i, (step,) in enumerate(df.select("step").unique(maintain_order=True).iter_rows()):
        part = df.filter(pl.col("step") == step).sort("layer")
        tok = part["tokens"][0]
        label = f"step {step:,}" if x == "step" or tok is None else f"{_si(tok)} tokens (step {step:,})"
        fig.add_trace(go.Scatter(
            x=part["layer"].to_list(), y=part["value"].to_list(), mode="lines+markers", name=label,
            line={"color": PALETTE[i % len(PALETTE)], "width": 1.6}, marker={"size": 5},
            customdata=part["layer_type"].to_list(),
            hovertemplate="layer %{x} (%{customdata}): %{y:.4g}<extra>" + label + "</extra>"))
    base_layout(fig, title, "layer index (0 = first block)", y_title, height)
    fig.update_layout(hovermode="closest")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def expert_load(counts: Sequence[int], layer: int, step: int, tokens: int | None, height: int = 380) -> go.Figure:
    """Bar chart of one MoE layer's token assignments per expert, with the mean and MaxVio."""
    c = np.asarray(counts, dtype=np.float64)
    mean = float(c.mean()) if c.size else 0.0
    maxvio = (float(c.max()) - mean) / mean if mean > 0 else float("nan")
    dead = int((c == 0).sum())
    colors = ["#d62728" if v == 0 else ("#ff7f0e" if mean and v > 2 * mean else "#1f77b4") for v in c]
    fig = go.Figure(go.Bar(x=list(range(c.size)), y=c.tolist(), marker={"color": colors},
                           hovertemplate="expert %{x}: %{y:,} assignments<extra></extra>", name="assignments"))
    fig.add_hline(y=mean, line={"color": "#444", "dash": "dash", "width": 1},
                  annotation_text=f"mean {mean:,.0f}", annotation_position="top left",
                  annotation_bgcolor="rgba(255,255,255,0.85)")
    when = f"step {step:,}" + (f", {_si(tokens)} tokens" if tokens is not None else "")
    base_layout(fig, f"Expert load, layer {layer}, {when}: MaxVio {maxvio:.2f}, {dead} idle",
                "expert index", "token assignments (count)", height)
    fig.update_layout(hovermode="closest", showlegend=False, bargap=0.1)
    return fig


def _si(n: float | None) -> str:
    """Format a count with an SI suffix (``1.2T``)."""
    if n is None:
        return "?"
    n = float(n)
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suf}"
    return f"{n:.0f}"


def signed_log(z: np.ndarray) -> np.ndarray:
    """``sign(z) * log10(1 + |z|)``: keeps small z readable while a 10^4 blow-up still fits."""
    return np.sign(z) * np.log10(1.0 + np.abs(z))


#: Tick values of the signed-log z axis, spaced so that their labels never overlap.
_Z_TICKS = [0, 1, 3, 10, 30, 100, 1000, 10000, 100000]


def zscores(frames: Mapping[str, pl.DataFrame], x: str, threshold: float, crossings: Mapping[str, Any],
            marks: Sequence[tuple[float, str, str]] = (), height: int = 480) -> go.Figure:
    """All signals' trailing z-scores on one axis (signed-log scale), with the ±threshold band,
    each signal's first crossing as a marker and vertical lines for ``marks`` ``(x, label, colour)``."""
    fig = go.Figure()
    for i, (name, df) in enumerate(frames.items()):
        if df.height == 0:
            continue
        color = PALETTE[i % len(PALETTE)]
        z = df["z"].to_numpy().astype(np.float64)
        shown = np.where(np.isposinf(z), 6.0, signed_log(np.clip(z, -1e5, 1e5)))
        fig.add_trace(go.Scatter(x=df[x].to_numpy(), y=shown, mode="lines", name=name, legendgroup=name,
                                   line={"color": color, "width": 1.5}, customdata=z,
                                   hovertemplate=name + ": z = %{customdata:.3g}<extra></extra>"))
        c = crossings.get(name)
        if c is not None:
            cx = c.step if x == "step" else c.tokens
            fig.add_trace(go.Scatter(x=[cx], y=[float(signed_log(np.array([min(max(c.z, -1e5), 1e5)]))[0])],
                                     mode="markers", legendgroup=name, showlegend=False,
                                     marker={"color": color, "size": 11, "symbol": "x", "line": {"width": 1}},
                                     hovertemplate=f"{name} first crosses at step {c.step:,}<extra></extra>"))
    t = float(signed_log(np.array([threshold]))[0])
    for y in (t, -t):
        fig.add_hline(y=y, line={"color": "#d62728", "dash": "dash", "width": 1})
    fig.add_hrect(y0=-t, y1=t, fillcolor="#9e9e9e", opacity=0.08, line_width=0)
    # Labels of the vertical lines are stacked (one row each) so that close lines never overprint.
    xs_all = [float(v) for df in frames.values() if df.height for v in (df[x].min(), df[x].max()) if v is not None]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    for row, (xv, label, color) in enumerate(m for m in marks if m[0] is not None):
        # A line in the right quarter gets its label on its left, so the label stays inside the plot.
        side = "right" if float(xv) > x_lo + 0.75 * (x_hi - x_lo) else "left"
        fig.add_vline(x=xv, line={"color": color, "dash": "dash", "width": 1.5})
        fig.add_annotation(x=xv, xref="x", y=1.0 - 0.075 * row, yref="paper", yanchor="top", xanchor=side,
                           text=label, showarrow=False, font={"size": 11, "color": color},
                           bgcolor="rgba(255,255,255,0.85)", borderpad=2)
    ticks = sorted({v for v in _Z_TICKS} | {-v for v in _Z_TICKS})
    base_layout(fig, "Signals normalised against their trailing window (robust z-score)", X_TITLES.get(x, x),
                "robust z (σ units), signed log scale", height, x)
    fig.update_yaxes(tickvals=signed_log(np.array(ticks, dtype=np.float64)).tolist(),
                     ticktext=[f"{v:g}" for v in ticks])
    return fig


def lineage(overview: pl.DataFrame, order: Sequence[str], height: int | None = None) -> go.Figure:
    """Runs as bars on the tokens axis (first to last logged tokens), each branch joined to its
    parent at the branch point: the lineage tree drawn on the comparison axis."""
    fig = go.Figure()
    rows = {r["run"]: r for r in overview.iter_rows(named=True)}
    y = {run: i for i, run in enumerate(order)}
    for run in order:
        r = rows[run]
        start = r.get("branch_tokens") if r.get("branch_tokens") is not None else r.get("first_tokens") or 0
        end = r.get("last_tokens")
        color = "#d62728" if r.get("firing") else ("#2ca02c" if r.get("live") else "#1f77b4")
        if end is not None:
            fig.add_trace(go.Scatter(x=[start, end], y=[y[run]] * 2, mode="lines+markers", showlegend=False,
                                     line={"color": color, "width": 8}, marker={"size": 9},
                                     hovertemplate=f"{run}: %{{x:.3s}} tokens<extra></extra>"))
        parent = r.get("parent")
        if parent in y and r.get("branch_tokens") is not None:
            fig.add_trace(go.Scatter(x=[r["branch_tokens"], r["branch_tokens"]], y=[y[parent], y[run]],
                                     mode="lines", showlegend=False, hoverinfo="skip",
                                     line={"color": "#9e9e9e", "width": 1.5, "dash": "dot"}))
    base_layout(fig, "Lineage on the tokens axis (branches drop from their parent at the branch point)",
                "tokens consumed", "", height or max(240, 130 + 42 * len(order)), "tokens")
    fig.update_yaxes(tickvals=list(y.values()), ticktext=list(y.keys()), autorange="reversed", showgrid=False)
    fig.update_layout(hovermode="closest", margin={"l": 160, "b": 60})
    return fig


def alert_timeline(intervals: pl.DataFrame, x: str = "step", height: int | None = None) -> go.Figure:
    """Gantt-style rows per alert instance: pending (amber) and firing (red) spans, resolved ends."""
    colors = {"pending": "#ffb74d", "firing": "#d62728"}
    labels = intervals["label"].unique(maintain_order=True).to_list()
    fig = go.Figure()
    shown: set[str] = set()
    x0c, x1c = f"{x}_from", f"{x}_to"
    for row in intervals.iter_rows(named=True):
        if row["state"] not in colors or row[x0c] is None:
            continue
        end = row[x1c] if row[x1c] is not None else row[x0c]
        fig.add_trace(go.Bar(
            x=[max(end - row[x0c], 0) or 1], base=[row[x0c]], y=[row["label"]], orientation="h",
            marker={"color": colors[row["state"]]}, name=row["state"], legendgroup=row["state"],
            showlegend=row["state"] not in shown, width=0.55,
            hovertemplate=(f"{row['label']}<br>{row['state']} from {x} %{{base:,}} to {end:,}"
                           f"<br>value {row['value']}<extra></extra>")))
        shown.add(row["state"])
    res = intervals.filter(pl.col("state") == "resolved")
    if res.height:
        fig.add_trace(go.Scatter(x=res[x0c].to_list(), y=res["label"].to_list(), mode="markers", name="resolved",
                                 marker={"symbol": "line-ns-open", "size": 16, "color": "#2ca02c",
                                         "line": {"width": 2}},
                                 hovertemplate="%{y}<br>resolved at %{x:,}<extra></extra>"))
    base_layout(fig, "Alert timeline: pending and firing spans per alert instance", X_TITLES.get(x, x),
                "", height or max(280, 170 + 34 * len(labels)), x)
    fig.update_layout(barmode="overlay", hovermode="closest", margin={"l": 260})
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return fig
