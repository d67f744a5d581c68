"""Run page: losses and MTP heads, grad norms, MaxVio, dead experts, heatmaps, profiles, markers."""

from __future__ import annotations

import plotly.graph_objects as go
import polars as pl
import streamlit as st

from healthwatch.app import charts
from healthwatch.app.data import cached, get_store

st.title("Run")
store = get_store()
runs = [] if store is None else store.sql("SELECT run FROM runs ORDER BY created").pl()["run"].to_list()
if store is not None and not runs:
    st.info("The store has no runs yet.")
if runs:
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
    # The run is also in the URL (?run=…), so a link or a bookmark opens the same run.
    wanted = st.query_params.get("run")
    run = c1.selectbox("run", runs, index=runs.index(wanted) if wanted in runs else 0)
    st.query_params["run"] = run
    x = c2.radio("x axis", ["step", "tokens"], horizontal=True)
    log_y = c3.toggle("log scale")
    smooth = c4.slider("smoothing (points)", 1, 50, 1)

    @st.fragment(run_every=5)
    def live(run: str = run) -> None:
        """Everything that refreshes live; cached on the store version, so idle refreshes read nothing."""
        store.refresh()
        names = cached(store, "scalar_names", run)
        if not names:
            st.info(f"Run `{run}` has not flushed its first step yet.")
            return
        ev = cached(store, "events", run)

        def series(name: str, layer: int | None = None) -> pl.DataFrame:
            return cached(store, "series", run, name, ("layer", layer), ("include_superseded", True))

        loss_names = [n for n in names if n.startswith("loss/")]
        fig = charts.lines({n: series(n) for n in loss_names}, x, "cross-entropy (nats)",
                           "Train loss and MTP heads", log_y, smooth)
        charts.add_markers(fig, ev, x)
        st.plotly_chart(fig, width="stretch", key="losses")
        g1, g2 = st.columns(2)
        gn = [n for n in names if n.startswith("grad_norm/")]
        g1.plotly_chart(charts.lines({n: series(n) for n in gn}, x, "L2 norm", "Gradient norms (before clipping)",
                                     log_y, smooth), width="stretch", key="gnorm")
        metrics = cached(store, "layer_metrics", run)
        if "maxvio" not in set(metrics["metric"].to_list()) if metrics.height else True:
            g2.info("This run has no MoE layers: no MaxVio or dead-expert signals.")
        else:
            mx = cached(store, "layer_aggregate", run, "maxvio", "max")
            md = cached(store, "layer_aggregate", run, "maxvio", "median")
            f = charts.lines({"max over layers": mx, "median over layers": md}, x, "MaxVio (max−mean)/mean",
                             "Expert balance (MaxVio)", log_y, smooth)
            g2.plotly_chart(f, width="stretch", key="maxvio")
        steps = store.sql("SELECT max(step) FROM layer_stats_effective WHERE run = ?", [run]).fetchone()[0]
        if steps is None:
            return
        h1, h2 = st.columns(2)
        for i, (metric, unit) in enumerate([("maxvio", "MaxVio"), ("resid_rms", "RMS"), ("wgrad_norm", "L2 norm"),
                                            ("dead_experts", "experts")]):
            hm = cached(store, "heatmap", run, metric, ("max_buckets", 200))
            col = (h1, h2)[i % 2]
            if hm.height:
                col.plotly_chart(charts.heatmap(hm, f"{metric} by layer and step", unit), width="stretch",
                                 key=f"hm-{metric}")
        st.session_state["hw_last_step"] = int(steps)

    live()
    last = st.session_state.get("hw_last_step")
    if last is not None:
        st.subheader("At a chosen step")
        at = st.slider("step", 0, max(1, last), last)
        p1, p2 = st.columns(2)
        prof = cached(store, "layer_profile", run, "resid_rms", at)
        if prof.height:
            fig = go.Figure(go.Bar(x=prof["layer"].to_list(), y=prof["value"].to_list()))
            fig.update_layout(title=f"Residual RMS per layer at step {prof['step'][0]}", xaxis_title="layer",
                              yaxis_title="RMS of residual stream", height=320)
            p1.plotly_chart(fig, width="stretch")
        load = cached(store, "expert_load_at", run, at)
        if load.height:
            layer = p2.selectbox("MoE layer", load["layer"].to_list())
            counts = load.filter(pl.col("layer") == layer)["counts"][0].to_list()
            fig = go.Figure(go.Bar(x=list(range(len(counts))), y=counts))
            fig.update_layout(title=f"Expert load, layer {layer}, step {load['step'][0]}", xaxis_title="expert",
                              yaxis_title="token assignments", height=320)
            p2.plotly_chart(fig, width="stretch")
