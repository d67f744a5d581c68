"""Runs page: lineage tree, health badge from firing alerts, last step/tokens, live or idle."""

from __future__ import annotations

import time

import polars as pl
import streamlit as st

from healthwatch.app.data import alerts_state, cached, get_store

LIVE_S = 60.0


@st.fragment(run_every=5)
def runs_table() -> None:
    """The runs of the store, parents first and branches indented under them."""
    store = get_store()
    if store is None:
        return
    df = cached(store, "runs_overview")
    if df.height == 0:
        st.info("The store has no runs yet.")
        return
    firing = alerts_state(store).filter(pl.col("state") == "firing")
    children: dict[str | None, list[dict]] = {}
    for row in df.iter_rows(named=True):
        children.setdefault(row["parent"] if row["parent"] in set(df["run"]) else None, []).append(row)
    rows = []

    def walk(parent: str | None, depth: int) -> None:
        for row in children.get(parent, []):
            n_firing = firing.filter(pl.col("run") == row["run"]).height
            live = row["last_write"] is not None and time.time() - row["last_write"] < LIVE_S
            rows.append({
                "run": "    " * depth + ("└ " if depth else "") + row["run"],
                "health": f"FIRING ({n_firing})" if n_firing else "ok",
                "status": "live" if live else "idle",
                "precision": row["precision"],
                "branch step": row["branch_step"],
                "attempts": row["attempts"],
                "last step": row["last_step"],
                "last tokens": row["last_tokens"],
            })
            walk(row["run"], depth + 1)

    walk(None, 0)
    st.dataframe(pl.DataFrame(rows), width="stretch", hide_index=True)


st.title("Runs")
runs_table()
