"""Alerts page: the firing/resolved timeline from the store and the active rules."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from healthwatch.app.data import get_store

st.title("Alerts")
store = get_store()
if store is not None:
    df = store.sql(
        "SELECT run, alert, severity, state, step, tokens, layer, value FROM alerts ORDER BY run, step"
    ).pl()
    if df.height == 0:
        st.info("No alert transitions recorded yet (`healthwatch alerts watch --store S` or `Monitor(alerts='default')`).")
    else:
        fig = px.scatter(df, x="step", y="alert", color="state",
                         symbol="run", hover_data=["severity", "tokens", "layer", "value"])
        fig.update_layout(xaxis_title="step", yaxis_title="alert rule", height=420)
        st.plotly_chart(fig, width="stretch")
        st.dataframe(df, width="stretch", hide_index=True)
try:
    from healthwatch.alerts.loader import load_pack  # type: ignore[attr-defined]

    st.subheader("Active rules (default pack)")
    st.write(load_pack("default"))
except Exception:  # noqa: BLE001 - the rules panel is optional
    st.caption("Rule listing unavailable in this installation.")
