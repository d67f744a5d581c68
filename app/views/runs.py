"""Runs page: the lineage tree of parents and branches, health from firing alerts, last step and
tokens, live or idle; each run links to its Run page."""

from __future__ import annotations

import time

import polars as pl
import streamlit as st

from healthwatch.app import charts
from healthwatch.app.data import get_store, runs_table, tree_order


def _age(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    for div, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= div:
            return f"{s / div:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _table() -> None:
    store = get_store()
    if store is None:
        return
    df = runs_table(store)
    if df.height == 0:
        st.info("The store has no runs yet. Start one with `hw.Monitor(store=...)`, or run `healthwatch demo`.")
        return
    now = time.time()
    order = tree_order(df)
    rows = {r["run"]: r for r in df.iter_rows(named=True)}
    names = set(rows)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("runs", df.height)
    m2.metric("live now", int(df["live"].sum()))
    m3.metric("alerts firing", int(df["firing"].sum()))
    m4.metric("branches", int(df["parent"].is_not_null().sum()))
    table = []
    for run, depth in order:
        r = rows[run]
        if r["firing"]:
            health = f"FIRING ({r['firing']}): {r['firing_alerts']}"
        elif r["pending"]:
            health = f"pending ({r['pending']})"
        else:
            health = "ok"
        branch = ""
        if r["parent"]:
            branch = f"{r['parent']}" + (" (missing)" if r["parent"] not in names else "")
            if r["branch_step"] is not None:
                branch += f" @ step {r['branch_step']:,}"
        table.append({
            "lineage": "    " * depth + ("└─ " if depth else "") + run,
            "health": health,
            "status": r["status"],
            "precision": r["precision"],
            "branched from": branch,
            "attempts": r["attempts"],
            "last step": r["last_step"],
            "last tokens": charts._si(r["last_tokens"]) if r["last_tokens"] is not None else "",
            "last write": _age(r["last_write"], now),
            "open": f"run?run={run}",
        })
    st.dataframe(
        pl.DataFrame(table), width="stretch", hide_index=True,
        column_config={
            "lineage": st.column_config.TextColumn("run (lineage)", width="medium"),
            "health": st.column_config.TextColumn("health", help="From the alerts table: firing/pending alert instances"),
            "status": st.column_config.TextColumn("status", help="finished: its Monitor closed; live: a row was written in the last 2 minutes; idle: neither"),
            "last step": st.column_config.NumberColumn("last step", format="%d"),
            "open": st.column_config.LinkColumn("Run page", display_text=r"run\?run=(.*)"),
        },
    )
    plot_rows = df.with_columns(pl.lit(None, dtype=pl.Int64).alias("first_tokens"))
    if df["last_tokens"].is_not_null().any():
        st.plotly_chart(charts.lineage(plot_rows, [r for r, _ in order]), width="stretch", key="lineage")
        st.caption("Bar colour: red = an alert is firing, green = live, blue = idle. "
                   "Dotted drops join a branch to its parent at the branch point.")


def main() -> None:
    """Draw the page; the table refreshes itself every 10 s."""
    st.title("Runs")
    st.fragment(run_every=10)(_table)()


main()
