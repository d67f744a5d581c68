"""Run page: every health signal of one run, live, one section at a time.

The header (precision, lineage, attempts, last step, alerts firing) sits above four sections,
drawn as tabs that are only queried and sent when open (``st.tabs(..., on_change="rerun")``): the
way Grafana and W&B lazy-load panels, so a first load costs three charts, not nine.

* **Overview** (first): losses with every MTP head, gradient norms, MaxVio max/median over layers,
  with alert and event markers and superseded attempts ghosted; other scalars behind a toggle.
* **Layers**: the MaxVio, residual-RMS and wgrad-norm layer x step heatmaps and dead experts.
* **At steps**: per-layer profiles at chosen steps and the expert-load histogram at a step.
* **Signals**: the signal families of docs/signals.md (a worst-layers "layer history" link opens it).

The open section is in the URL (``?section=Layers``), so a link or a bookmark opens it. Overview and
Layers sit in a fragment that re-runs every few seconds and only reads new rows; a closed section
is neither queried nor refreshed.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from datetime import datetime
from urllib.parse import urlencode

import polars as pl
import streamlit as st

from healthwatch.app import charts
from healthwatch.app.data import (
    HALF_POINTS,
    Signal,
    alert_states,
    cached_run,
    expert_load_at,
    expert_load_steps,
    get_store,
    heatmap,
    layer_info,
    layer_profiles,
    markers,
    profile_steps,
    run_names,
    run_overview,
    run_signature,
    scalar_names,
    series,
)
from healthwatch.query.signals import FAMILIES, expert_load_matrix, signal_metrics, worst_layers
from healthwatch.store import Store

LAYER_UNITS = {
    "maxvio": ("MaxVio", "MaxVio (max−mean)/mean, ratio"),
    "resid_rms": ("Residual RMS", "residual RMS (activation units)"),
    "resid_rms_max": ("Residual RMS, max over tokens", "max-token RMS (activation units)"),
    "wgrad_norm": ("Weight-gradient norm", "weight-grad L2 norm"),
    "dead_experts": ("Dead experts", "experts with zero load (count)"),
}
EVENT_KINDS = ("rollback", "checkpoint", "note", "alert firing", "alert resolved")


def _mtp_order(name: str) -> tuple[int, int, str]:
    """loss/train first, then the MTP heads in numeric order, then anything else."""
    if name == "loss/train":
        return (0, 0, name)
    m = re.match(r"loss/mtp_(\d+)$", name)
    return (1, int(m.group(1)), name) if m else (2, 0, name)


def _frames(points: pl.DataFrame, names: list[str], labels: dict[str, str] | None = None) -> dict[str, pl.DataFrame]:
    """Split the long points frame into one frame per signal, in ``names`` order."""
    out: dict[str, pl.DataFrame] = {}
    for n in names:
        part = points.filter(pl.col("sig") == n)
        if part.height:
            out[(labels or {}).get(n, n)] = part
    return out


def _header(store: Store, run: str) -> dict:
    """The run's one-line summary (precision, lineage, attempts, last step, status, alerts firing)."""
    info = cached_run(store, run, run_overview)
    states = alert_states(store)
    firing = states.filter((pl.col("run") == run) & (pl.col("state") == "firing")).height if states.height else 0
    live = info["status"] == "live"
    parts = [f"**{info['precision'] or 'unknown precision'}**"]
    if info["parent"]:
        at = f"step {info['branch_step']:,}" if info["branch_step"] is not None else "an unknown step"
        tok = f" ({charts._si(info['branch_tokens'])} tokens)" if info["branch_tokens"] is not None else ""
        parts.append(f"branch of **{info['parent']}** at {at}{tok}")
    if info["attempts"]:
        parts.append(f"{info['attempts']} attempt{'s' if info['attempts'] != 1 else ''}"
                     + (f", {info['rollbacks']} rolled back" if info["rollbacks"] else ""))
    if info["last_step"] is not None:
        parts.append(f"last step **{info['last_step']:,}** · {charts._si(info['last_tokens'])} tokens")
    parts.append(":green[live]" if live else info["status"])
    parts.append(f":red[**{firing} alert{'s' if firing != 1 else ''} firing**]" if firing else "no alert firing")
    st.markdown(" · ".join(parts))
    if info["last_step"] is None:
        st.info(f"Run `{run}` has not flushed its first step yet: the charts appear once it has "
                "(the Monitor flushes every few seconds).")
    elif not info["several_steps"]:
        st.info(f"Run `{run}` is in its first step (step {info['last_step']:,}): the charts fill in as steps arrive.")
    info["live"] = live
    return info


def _scalar_groups(store: Store, run: str) -> tuple[list[str], list[str], list[str]]:
    """The run's scalar names split into losses (train first, then MTP heads), gradient norms and the rest."""
    names = cached_run(store, run, scalar_names)
    losses = sorted([n for n in names if n.startswith("loss/")], key=_mtp_order)
    grads = sorted(n for n in names if n.startswith("grad_norm/"))
    return losses, grads, [n for n in names if n not in losses and n not in grads]


def _layer_metrics(store: Store, run: str) -> set[str]:
    """Per-layer metrics the run logged."""
    layers = cached_run(store, run, layer_info)
    return set(layers["metric"].to_list()) if layers.height else set()


def _caption(n: int, t0: float) -> None:
    """Points drawn and the server-side build time (bench_render reads "built in X s")."""
    st.caption(f"{n:,} points drawn (min/max per bucket, ≤ 2,000 per full-width trace, ≤ 1,000 per half-width "
               "one) · built in "
               f"{time.perf_counter() - t0:.2f} s · {datetime.now():%H:%M:%S}")


#: Tables whose files the Overview's figures are drawn from (its shared-figure key).
_OVERVIEW_TABLES = ("scalars", "layer_stats", "attempts", "events", "alerts")


class _FigureCache:
    """A small LRU of built figures shared by every session of the server (read-only once built:
    ``st.plotly_chart`` copies a figure into its message and never changes it)."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._items: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> dict | None:
        """The figures built for ``key``, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple, item: dict) -> None:
        """Keep ``item`` for ``key`` (the least recently used entry goes beyond ``size``)."""
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@st.cache_resource(show_spinner=False)
def _shared_figures() -> _FigureCache:
    return _FigureCache()


def _overview_figures(store: Store, run: str, x: str, log_y: bool, smooth: float, losses: list[str],
                      grads: list[str]) -> dict:
    """The Overview's figures (``loss``, ``gn``, ``mv``; None where the run has no such signal) and ``n``,
    the points drawn."""
    # Only what this section draws is read: the other scalars wait for their toggle, and whether the
    # run has MoE layers is told by the MaxVio series itself (the layer list is a query of its own).
    # The losses chart is full width; gradient norms and MaxVio sit side by side at half the width,
    # so they get half the points (the browser's drawing cost grows with them).
    scal = pl.concat([series(store, run, [Signal(n) for n in losses]),
                      series(store, run, [Signal(n) for n in grads], max_points=HALF_POINTS)])
    agg = series(store, run, [Signal("maxvio", "max"), Signal("maxvio", "median")], max_points=HALF_POINTS)
    marks = cached_run(store, run, markers, tables=("events", "alerts", "attempts"))
    rev = f"{run}-{x}"
    out: dict = {"loss": None, "gn": None, "mv": None, "n": scal.height + agg.height}
    if losses:
        out["loss"] = charts.lines(_frames(scal, losses), x, "cross-entropy (nats per token)",
                                   "Train loss and every MTP head", log_y, smooth, height=380, revision=rev + "-loss")
        charts.add_markers(out["loss"], marks, x)
    if grads:
        out["gn"] = charts.lines(_frames(scal, grads), x, "L2 norm (before clipping)",
                                 "Gradient norms: total, output, embedding, MTP", log_y, smooth, revision=rev + "-gn")
        charts.add_markers(out["gn"], marks, x, kinds=("rollback", "alert firing"))
    if agg.height:
        out["mv"] = charts.lines(_frames(agg, ["maxvio:max", "maxvio:median"],
                                         {"maxvio:max": "max over layers", "maxvio:median": "median over layers"}),
                                 x, "MaxVio (max−mean)/mean, ratio", "Expert balance: MaxVio over MoE layers",
                                 log_y, smooth, revision=rev + "-mv")
        charts.add_markers(out["mv"], marks, x, kinds=("rollback", "alert firing"))
    return out


def _overview(store: Store, run: str, x: str, log_y: bool, smooth: float) -> None:
    """Losses, gradient norms and MaxVio over layers (the first section). Refreshes live; cached per
    run, so an idle refresh issues no SQL."""
    t0 = time.perf_counter()
    if cached_run(store, run, run_overview)["last_step"] is None:
        return  # the header says the run has not flushed a step yet; a live refresh draws the charts
    losses, grads, others = _scalar_groups(store, run)
    # The three figures are built once per (run's files, view options) and shared by every session
    # (a new session on an unchanged run re-reads nothing and rebuilds nothing: ~0.1 s of plotly
    # objects per load); a new segment of the run changes the key.
    key = (run_signature(store, run, _OVERVIEW_TABLES), x, log_y, smooth, tuple(losses), tuple(grads))
    figs = _shared_figures().get(key)
    if figs is None:
        figs = _overview_figures(store, run, x, log_y, smooth, losses, grads)
        _shared_figures().put(key, figs)

    if figs["loss"] is not None:
        st.plotly_chart(figs["loss"], width="stretch", key="chart_losses", config={"displaylogo": False})
    else:
        st.info("No losses logged for this run (`loss/train`, `loss/mtp_<k>`).")

    c1, c2 = st.columns(2)
    with c1:
        if figs["gn"] is not None:
            st.plotly_chart(figs["gn"], width="stretch", key="chart_gradnorm", config={"displaylogo": False})
        else:
            st.info("No gradient norms logged (`grad_norm/*`).")
    with c2:
        if figs["mv"] is not None:
            st.plotly_chart(figs["mv"], width="stretch", key="chart_maxvio", config={"displaylogo": False})
        else:
            st.info("This run has no MoE layers: no MaxVio, dead-expert or expert-load signals.")

    n = figs["n"]
    # A toggle rather than an expander: a collapsed expander still makes the browser draw every
    # chart inside it (~0.1 s each); these are only read, built and drawn when asked for.
    if others and st.toggle(f"Show other scalars ({', '.join(others[:6])}{'…' if len(others) > 6 else ''})",
                            key="show_other"):
        rest = series(store, run, [Signal(n) for n in others])
        n += rest.height
        cols = st.columns(2)
        for i, name in enumerate(others):
            fig = charts.lines(_frames(rest, [name]), x, name, name, log_y, smooth, height=320,
                               revision=f"{run}-{x}-{name}")
            cols[i % 2].plotly_chart(fig, width="stretch", key=f"chart_other_{name}")
    _caption(n, t0)


def _layers(store: Store, run: str, x: str, log_y: bool) -> None:
    """The layer x step heatmaps (MaxVio, residual RMS, wgrad norm) and dead experts. Refreshes live."""
    t0 = time.perf_counter()
    metrics = _layer_metrics(store, run)
    if not metrics:
        st.info("No per-layer metrics logged for this run (residual norms, wgrad norms, MaxVio).")
        return
    losses, _grads, others = _scalar_groups(store, run)
    ref_name = losses[0] if losses else others[0] if others else None
    # The tokens axis of a heatmap is interpolated from one scalar's (step, tokens) pairs.
    ref = (series(store, run, [Signal(ref_name)]).filter(~pl.col("superseded")) if ref_name and x == "tokens"
           else None)
    rev = f"{run}-{x}"
    cells = 0

    def heat(metric: str, col: st.delta_generator.DeltaGenerator, key: str) -> None:
        nonlocal cells
        title, unit = LAYER_UNITS.get(metric, (metric, metric))
        with col:
            if metric not in metrics:
                st.info(f"No `{metric}` logged for this run.")
                return
            df = cached_run(store, run, heatmap, metric)
            if df.height == 0:
                st.info(f"No `{metric}` rows yet.")
                return
            cells += df.height
            fig = charts.heatmap(df, f"{title} by layer and step", unit, x, ref, log_color=log_y,
                                 revision=f"{rev}-{key}")
            st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})

    n = 0
    if "maxvio" in metrics:
        h1, h2 = st.columns(2)
        heat("maxvio", h1, "heat_maxvio")
        with h2:
            if "dead_experts" in metrics:
                dead = series(store, run, [Signal("dead_experts", "max"), Signal("dead_experts", "sum")],
                              max_points=HALF_POINTS)
                n += dead.height
                marks = cached_run(store, run, markers, tables=("events", "alerts", "attempts"))
                fig = charts.lines(_frames(dead, ["dead_experts:max", "dead_experts:sum"],
                                           {"dead_experts:max": "max over layers", "dead_experts:sum": "total over layers"}),
                                   x, "experts with zero load (count)",
                                   "Dead experts (no tokens over the trailing window)", False, 0.0,
                                   revision=rev + "-dead")
                charts.add_markers(fig, marks, x, kinds=("rollback", "alert firing"))
                st.plotly_chart(fig, width="stretch", key="chart_dead", config={"displaylogo": False})
            else:
                st.info("No `dead_experts` logged for this run.")
    else:
        st.info("This run has no MoE layers: no MaxVio or dead-expert signals.")
    r1, r2 = st.columns(2)
    heat("resid_rms", r1, "heat_resid")
    heat("wgrad_norm", r2, "heat_wgrad")
    st.caption(f"{cells:,} heatmap cells and {n:,} points drawn · built in {time.perf_counter() - t0:.2f} s · "
               f"{datetime.now():%H:%M:%S}")


def _at_steps(store: Store, run: str, x: str, log_y: bool) -> None:
    """Per-layer residual profiles at chosen steps and the expert-load histogram at a chosen step."""
    info = cached_run(store, run, run_overview)
    layers = cached_run(store, run, layer_info)
    if info["last_step"] is None or layers.height == 0:
        st.info("No per-layer metrics logged for this run: no profiles or expert load to show.")
        return
    lo, hi = int(info["first_step"]), int(info["last_step"])
    c1, c2 = st.columns(2)
    with c1:
        metrics = [m for m in ("resid_rms", "resid_rms_max", "wgrad_norm", "maxvio")
                   if m in set(layers["metric"].to_list())]
        if not metrics:
            st.info("No per-layer profiles to show.")
        else:
            metric = st.selectbox("Per-layer profile of", metrics, key="prof_metric",
                                  format_func=lambda m: LAYER_UNITS.get(m, (m,))[0])
            marks = cached_run(store, run, markers, tables=("events", "alerts", "attempts"))
            special = marks.filter(pl.col("kind").is_in(["rollback", "alert firing"]) & ~pl.col("superseded"))
            even = profile_steps(lo, hi)
            grid = sorted(set(even) | set(special["step"].to_list()))
            default = sorted({even[0], even[len(even) // 2], even[-1]})
            picked = st.multiselect("Steps (type another step and press Enter to add it)", grid, default=default,
                                    key="prof_steps", accept_new_options=True, max_selections=8)
            steps = sorted({int(s) for s in picked if str(s).strip().lstrip("-").isdigit()})
            if not steps:
                st.info("Pick at least one step.")
            else:
                df = cached_run(store, run, layer_profiles, metric, tuple(steps))
                if df.height == 0:
                    st.info("No rows at or before those steps.")
                else:
                    title, unit = LAYER_UNITS.get(metric, (metric, metric))
                    st.plotly_chart(charts.profile(df, f"{title} per layer at chosen steps", unit, x, log_y),
                                    width="stretch", key="chart_profile")
    with c2:
        samples = cached_run(store, run, expert_load_steps, tables=("expert_load", "attempts"))
        if not samples:
            st.info("No expert-load samples for this run (MoE runs sample every `expert_load_every` steps).")
            return
        at = samples[-1]
        if len(samples) > 1:
            at = st.slider("Expert load at step (nearest sample at or before)", samples[0], samples[-1], samples[-1],
                           key="load_step")
        load = cached_run(store, run, expert_load_at, int(at), tables=("expert_load", "attempts"))
        if load.height == 0:
            st.info("No expert-load sample at or before that step.")
            return
        layer = st.selectbox("MoE layer", load["layer"].to_list(), key="load_layer")
        row = load.filter(pl.col("layer") == layer).row(0, named=True)
        st.plotly_chart(charts.expert_load(row["counts"], layer, row["step"], row["tokens"]), width="stretch",
                        key="chart_load")


#: Signals where a LOW value is the bad one ("worst layers" sorts ascending).
LOW_IS_BAD = ("router_entropy", "ssm_decay_min", "ssm_decay_mean")


def _with_history(df: pl.DataFrame, run: str, metric: str) -> pl.DataFrame:
    """``df`` (one row per layer) with a ``history`` column: a link to that layer's history of ``metric``."""
    if not df.height or "layer" not in df.columns:
        return df
    urls = [f"?{urlencode({'run': run, 'signal': metric, 'layer': int(layer)})}" for layer in df["layer"]]
    return df.with_columns(pl.Series("history", urls, dtype=pl.Utf8))


def _layer_history(store: Store, run: str, metric: str, layer: int, x: str, log_y: bool) -> None:
    """The whole history of ``metric`` in one layer (opened from a worst-layers link)."""
    sig = Signal(metric, "max", layers=(layer, layer))  # max over one layer = its value
    pts = series(store, run, [sig])
    fig = charts.lines(_frames(pts, [sig.key], {sig.key: f"layer {layer}"}), x, metric,
                       f"{metric}: history of layer {layer}", log_y, 0.0, revision=f"{run}-sig-{metric}-{layer}")
    st.plotly_chart(fig, width="stretch", key="chart_sig_layer")


def _signals(store: Store, run: str, x: str, log_y: bool) -> None:
    """Signals beyond the report (docs/signals.md): per family, max/median over layers, the layer x step
    heatmap, the worst layers now, and the expert x layer load at a step (and its change)."""
    metrics = cached_run(store, run, signal_metrics)
    samples = cached_run(store, run, expert_load_steps, tables=("expert_load", "attempts"))
    if not metrics and not samples:
        st.info("No signals beyond the report logged for this run (see docs/signals.md).")
        return
    st.subheader("Signals: quantisation, updates, routers, Mamba")
    if metrics:
        fams = [f for f, ms in FAMILIES.items() if any(m.split("/", 1)[0] in ms for m in metrics)]
        # A "layer history" link of the worst-layers tables opens ?run=R&signal=M&layer=L: preselect M.
        linked, linked_layer = st.query_params.get("signal"), st.query_params.get("layer")
        linked_fam = next((f for f in fams if linked in metrics and linked.split("/", 1)[0] in FAMILIES[f]), None)
        fam = st.radio("Family", fams, index=fams.index(linked_fam) if linked_fam else 0, horizontal=True,
                       key="sig_family")
        choices = [m for m in metrics if m.split("/", 1)[0] in FAMILIES[fam]]
        metric = st.selectbox("Signal", choices, index=choices.index(linked) if linked in choices else 0,
                              key="sig_metric")
        if linked == metric and linked_layer is not None and linked_layer.lstrip("-").isdigit():
            _layer_history(store, run, metric, int(linked_layer), x, log_y)
        agg = series(store, run, [Signal(metric, "max"), Signal(metric, "median")])
        c1, c2 = st.columns(2)
        with c1:
            fig = charts.lines(_frames(agg, [f"{metric}:max", f"{metric}:median"],
                                       {f"{metric}:max": "max over layers", f"{metric}:median": "median over layers"}),
                               x, metric, f"{metric}: max and median over layers", log_y, 0.0, revision=f"{run}-sig")
            st.plotly_chart(fig, width="stretch", key="chart_sig_overview")
        with c2:
            df = cached_run(store, run, heatmap, metric)
            if df.height:
                st.plotly_chart(charts.heatmap(df, f"{metric} by layer and step", metric, x, log_color=log_y,
                                               revision=f"{run}-sigheat"), width="stretch", key="chart_sig_heat")
        k1, k2 = st.columns(2)
        k = int(k1.number_input("Worst layers: top K", 1, 200, 10, key="sig_k"))
        window = int(k2.number_input("Rise over the last N steps", 1, 10**9, 100, key="sig_window"))
        worst = cached_run(store, run, worst_layers, metric, k=k, window=window,
                           lowest=metric.split("/", 1)[0] in LOW_IS_BAD)
        by_rise = cached_run(store, run, worst_layers, metric, k=10**6, window=window).drop_nulls("rise").sort(
            "rise", descending=True).head(k)
        w1, w2 = st.columns(2)
        w1.caption(f"Worst {k} layers by value now ({'lowest' if metric.split('/', 1)[0] in LOW_IS_BAD else 'highest'})")
        links = {"history": st.column_config.LinkColumn("history", display_text="layer history")}
        w1.dataframe(_with_history(worst, run, metric), hide_index=True, width="stretch", column_config=links)
        w2.caption(f"Top {k} layers by rise over {window} steps")
        w2.dataframe(_with_history(by_rise, run, metric), hide_index=True, width="stretch", column_config=links)
    if samples:
        a1, a2 = st.columns(2)
        at = a1.select_slider("Expert x layer load at step", samples, samples[-1], key="sig_load_at")
        base = a2.select_slider("... change since step", ["none", *samples], "none", key="sig_load_base")
        layers, step_a, mat = cached_run(store, run, expert_load_matrix, int(at), tables=("expert_load", "attempts"))
        if layers:
            title = f"Share of each MoE layer's assignments per expert at step {step_a}"
            if base != "none":
                lb, step_b, mb = cached_run(store, run, expert_load_matrix, int(base),
                                            tables=("expert_load", "attempts"))
                if lb == layers and mb.shape == mat.shape:
                    mat, title = mat - mb, f"Change of the expert load share, step {step_b} -> {step_a}"
            import plotly.express as px

            fig = px.imshow(mat, labels={"x": "expert", "y": "layer", "color": "share"}, aspect="auto",
                            y=[str(v) for v in layers], title=title,
                            color_continuous_scale="RdBu_r" if base != "none" else "Viridis")
            st.plotly_chart(fig, width="stretch", key="chart_sig_load")


#: The page's sections, first = shown on a first load. Their labels are URL values (?section=Layers).
SECTIONS = ("Overview", "Layers", "At steps", "Signals")


def _first_section() -> str:
    """The section a new session opens on: Signals when a worst-layers link (?signal=M&layer=L) asked
    for a signal's history, else Overview. ``?section=`` (bound to the tabs) overrides both."""
    return "Signals" if st.query_params.get("signal") else SECTIONS[0]


def main() -> None:
    """Draw the page."""
    st.title("Run")
    store = get_store()
    if store is None:
        return
    runs = run_names(store)
    if not runs:
        st.info("The store has no runs yet. Start one with `hw.Monitor(store=...)` or `healthwatch demo`.")
        return
    c1, c2, c3, c4, c5 = st.columns([3, 2, 1, 2, 2])
    # The run is also in the URL (?run=…), so a link or a bookmark opens the same run.
    wanted = st.query_params.get("run")
    run = c1.selectbox("Run", runs, index=runs.index(wanted) if wanted in runs else len(runs) - 1, key="run_pick")
    st.query_params["run"] = run
    x = c2.radio("x axis", ["step", "tokens"], horizontal=True, key="x_axis")
    log_y = c3.toggle("log scale", key="log_y")
    smooth = c4.slider("smoothing (EMA weight)", 0.0, 0.99, 0.0, 0.01, key="smooth",
                       help="Exponential moving average of the drawn points; raw points stay faint behind.")
    live = cached_run(store, run, run_overview)["status"] == "live"
    every = c5.selectbox("live refresh", ["off", "2 s", "5 s", "10 s", "30 s"],
                         index=2 if live else 0, key=f"refresh_{run}",
                         help="Re-read new rows every few seconds without reloading the page (the open section only).")
    run_every = None if every == "off" else float(every.split()[0])
    st.fragment(run_every=run_every)(_header)(store, run)
    # Lazy sections: with state tracking (bind="query-params" implies a rerun on switch) only the open
    # tab's content runs, so a closed tab's charts are neither queried nor sent to the browser. The
    # key is the URL parameter: ?section=Layers opens that section.
    tabs = st.tabs(SECTIONS, key="section", default=_first_section(), bind="query-params")
    overview, layers, at_steps, signals = tabs
    if overview.open:
        with overview:
            st.fragment(run_every=run_every)(_overview)(store, run, x, log_y, smooth)
    if layers.open:
        with layers:
            st.fragment(run_every=run_every)(_layers)(store, run, x, log_y)
    if at_steps.open:
        with at_steps:
            st.fragment(_at_steps)(store, run, x, log_y)
    if signals.open:
        with signals:
            st.fragment(_signals)(store, run, x, log_y)


main()
