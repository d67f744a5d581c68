"""Alerts page: the pending/firing/resolved timeline from the store's event-sourced ``alerts``
table, the current state of every alert instance, and the active rules of the default pack."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import polars as pl
import streamlit as st

from healthwatch.app import charts
from healthwatch.app.data import alert_transitions, get_store, runs_table
from healthwatch.store import Store


def intervals(transitions: pl.DataFrame, last_steps: dict[str, Any], last_tokens: dict[str, Any]) -> pl.DataFrame:
    """Spans per alert instance: each transition lasts until the next one of the same instance,
    or, while still pending/firing, until the run's last step."""
    out = []
    for (run, _fp), part in transitions.sort("wall_time", "step").group_by(["run", "fingerprint"], maintain_order=True):
        rows = part.to_dicts()
        for i, row in enumerate(rows):
            nxt = rows[i + 1] if i + 1 < len(rows) else None
            open_end = row["state"] in ("pending", "firing")
            layer = f" · layer {row['layer']}" if row["layer"] is not None else ""
            out.append({
                "label": f"{row['alert']} · {run}{layer}",
                "run": run, "alert": row["alert"], "state": row["state"], "severity": row["severity"],
                "value": row["value"],
                "step_from": row["step"], "tokens_from": row["tokens"],
                "step_to": nxt["step"] if nxt else (last_steps.get(run) if open_end else None),
                "tokens_to": nxt["tokens"] if nxt else (last_tokens.get(run) if open_end else None),
            })
    return pl.DataFrame(out, schema={"label": pl.Utf8, "run": pl.Utf8, "alert": pl.Utf8, "state": pl.Utf8,
                                     "severity": pl.Utf8, "value": pl.Float64, "step_from": pl.Int64,
                                     "tokens_from": pl.Int64, "step_to": pl.Int64, "tokens_to": pl.Int64})


def _summary(annotations: str | None) -> str:
    try:
        ann = json.loads(annotations or "{}")
    except ValueError:
        return ""
    return str(ann.get("summary") or ann.get("description") or "") if isinstance(ann, dict) else ""


def _timeline(store: Store, runs: list[str], x: str) -> None:
    df = alert_transitions(store)
    if df.height == 0:
        st.info("No alert transitions recorded yet. Alerts are evaluated by `healthwatch alerts watch --store S` "
                "or inside the trainer with `Monitor(alerts=...)`; their pending/firing/resolved transitions "
                "land in the store's `alerts` table.")
        return
    if runs:
        df = df.filter(pl.col("run").is_in(runs))
    overview = runs_table(store)
    last_steps = dict(zip(overview["run"].to_list(), overview["last_step"].to_list())) if overview.height else {}
    last_tokens = dict(zip(overview["run"].to_list(), overview["last_tokens"].to_list())) if overview.height else {}
    latest = df.sort("wall_time", "step").group_by("run", "fingerprint", maintain_order=True).last()
    m1, m2, m3 = st.columns(3)
    m1.metric("firing now", latest.filter(pl.col("state") == "firing").height)
    m2.metric("pending", latest.filter(pl.col("state") == "pending").height)
    m3.metric("resolved", latest.filter(pl.col("state") == "resolved").height)
    spans = intervals(df, last_steps, last_tokens)
    if spans.height:
        st.plotly_chart(charts.alert_timeline(spans, x), width="stretch", key="alert_timeline")
    st.subheader("Current state per alert instance")
    cur = latest.with_columns(pl.col("annotations").map_elements(_summary, return_dtype=pl.Utf8).alias("summary"))
    order = {"firing": 0, "pending": 1, "resolved": 2}
    cur = cur.with_columns(pl.col("state").replace_strict(order, default=3).alias("_o")).sort("_o", "run", "alert")
    st.dataframe(cur.select("run", "alert", "state", "severity", "step", "tokens", "layer", "value", "summary"),
                 width="stretch", hide_index=True,
                 column_config={"step": st.column_config.NumberColumn("since step", format="%d")})
    with st.expander(f"All {df.height} transitions"):
        st.dataframe(df.select("run", "alert", "group", "state", "severity", "step", "tokens", "layer", "value",
                               "labels", "annotations"), width="stretch", hide_index=True)


def load_rules() -> tuple[list[dict[str, Any]], str]:
    """Rules of the default pack as plain rows, and where they came from.

    Uses the alert engine's loader when it is installed (``healthwatch.alerts.loader``), else
    reads the pack's YAML directly; returns ``([], reason)`` when neither is available.
    """
    try:
        from healthwatch.alerts import loader  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the engine is optional for the app
        loader = None
    if loader is not None:
        for fn_name in ("load_pack", "load_default_pack", "load_rules", "load"):
            fn = getattr(loader, fn_name, None)
            if fn is None:
                continue
            try:
                pack = fn("default")
            except Exception:  # noqa: BLE001 - try the next entry point, then the YAML
                continue
            rows = _rows_from_model(pack)
            if rows:
                return rows, f"`healthwatch.alerts.loader.{fn_name}('default')`"
    try:
        import yaml

        text = resources.files("healthwatch.alerts.packs").joinpath("default.yaml").read_text()
        return _rows_from_model(yaml.safe_load(text)), "`healthwatch/alerts/packs/default.yaml`"
    except Exception as exc:  # noqa: BLE001 - shown as a message
        return [], f"no default rule pack available ({type(exc).__name__}: {exc})"


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _rows_from_model(pack: Any) -> list[dict[str, Any]]:
    """Flatten a pack (dict from YAML or the engine's model) into one row per rule."""
    groups = _get(pack, "groups", None)
    if groups is None and isinstance(pack, list):
        groups = [{"name": "", "rules": pack}]
    rows = []
    for g in groups or []:
        for r in _get(g, "rules", []) or []:
            expr = _get(r, "expr", "")
            if hasattr(expr, "model_dump"):
                expr = expr.model_dump(exclude_none=True)
            kind = _get(expr, "detector", None) or _get(expr, "type", None) or _get(expr, "kind", None)
            if kind is None and isinstance(expr, dict) and len(expr) == 1:
                kind = next(iter(expr))
            ann = _get(r, "annotations", {}) or {}
            rows.append({
                "group": _get(g, "name", ""),
                "alert": _get(r, "alert", ""),
                "detector": str(kind or ""),
                "for": str(_get(r, "for", "") or ""),
                "severity": str(_get(r, "severity", "") or _get(_get(r, "labels", {}) or {}, "severity", "") or ""),
                "summary": str(_get(ann, "summary", "") or ""),
                "expr": json.dumps(expr, default=str) if not isinstance(expr, str) else expr,
            })
    return rows


def main() -> None:
    """Draw the page."""
    st.title("Alerts")
    store = get_store()
    if store is not None:
        overview = runs_table(store)
        runs = overview["run"].to_list() if overview.height else []
        c1, c2 = st.columns([4, 1])
        chosen = c1.multiselect("Runs", runs, default=[], placeholder="all runs", key="alert_runs")
        x = c2.radio("x axis", ["step", "tokens"], horizontal=True, key="alert_x")
        st.fragment(run_every=10)(_timeline)(store, chosen, x)
    st.subheader("Active rules (default pack)")
    rows, source = load_rules()
    if rows:
        st.caption(f"{len(rows)} rules from {source}. Backtest a run with "
                   "`healthwatch alerts backtest --store S --run R`.")
        st.dataframe(pl.DataFrame(rows), width="stretch", hide_index=True,
                     column_config={"expr": st.column_config.TextColumn("expr", width="large")})
    else:
        st.info(f"Rule listing unavailable: {source}. The alert engine ships the default pack as "
                "`healthwatch/alerts/packs/default.yaml`.")


main()
