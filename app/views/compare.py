"""Compare page: runs on a tokens axis, the relative precision gap per branch, and a summary.

Pick a parent and its branches (e.g. an NVFP4 run and BF16 segments cut from its checkpoints) or
any runs; the low-precision run's loss is compared with each reference interpolated at the same
consumed tokens (:func:`healthwatch.compare.relative_gap`, the same code the ``gap`` alert uses).
Every failure a user can cause (missing parent, no overlap, empty store) is a message, never a
traceback.
"""

from __future__ import annotations

import io
from typing import Any

import polars as pl
import streamlit as st

from healthwatch.app.compare_charts import (
    add_branch_marks,
    signal_figure,
    signal_label,
    signal_options,
    summary_table,
    unit_title,
)
from healthwatch.app.data import cached, get_store
from healthwatch.branch import lineage_tree, orphan_branches
from healthwatch.compare import (
    GAP_SCHEMA,
    CompareError,
    comparison_figure,
    figure_png,
    gap_figure,
    gap_summary,
    kaleido_available,
    loss_figure,
    orient,
    relative_gap,
    summary_figure,
)
from healthwatch.store import Store

MODES = ("Parent and its branches", "Any runs")


# Cached on the store's version: a rerun without new segments re-reads nothing. `_store` is not
# hashed (leading underscore); the root and version are the key.
@st.cache_data(max_entries=128, show_spinner=False)
def _gap(_store: Store, root: str, version: int, low: str, ref: str, metric: str,
         smooth: str | None, span: float, unit: str) -> tuple[pl.DataFrame | None, str | None]:
    try:
        return relative_gap(_store, low, ref, metric, smooth=smooth, span=span, unit=unit), None  # type: ignore[arg-type]
    except CompareError as exc:
        return None, str(exc)


@st.cache_data(max_entries=64, show_spinner=False)
def _summary(_store: Store, root: str, version: int, parent: str | None, branches: tuple[str, ...],
             pairs: tuple[tuple[str, str], ...], metric: str, smooth: str | None, span: float,
             unit: str) -> tuple[pl.DataFrame | None, str | None]:
    try:
        df = gap_summary(_store, parent, pairs=list(pairs) if parent is None else None,
                         branches=branches if parent is not None else None,
                         metric=metric, smooth=smooth, span=span, unit=unit)  # type: ignore[arg-type]
        return df, None
    except CompareError as exc:
        return None, str(exc)


@st.cache_data(max_entries=32, show_spinner=False)
def _tree(_store: Store, root: str, version: int, run: str) -> pl.DataFrame:
    return lineage_tree(_store, run)


def _choose_runs(overview: pl.DataFrame) -> tuple[str | None, list[str], list[tuple[str, str]]]:
    """The widgets that pick what to compare: ``(parent or None, branches, (low, ref) pairs)``."""
    runs = overview["run"].to_list()
    meta = {r["run"]: r for r in overview.iter_rows(named=True)}
    parents = list(dict.fromkeys(p for p in overview["parent"].to_list() if p is not None))
    params = st.query_params
    default_mode = 1 if not parents or params.get("runs") else 0
    mode = st.radio("Compare", MODES, index=default_mode, horizontal=True, key="cmp_mode")
    if mode == MODES[0]:
        if not parents:
            st.info("No run has branches yet: branch a run with `Monitor(parent=..., branch_step=...)`, "
                    "or compare any runs.")
            return None, [], []
        wanted = params.get("parent")
        parent = st.selectbox("Parent run", parents, index=parents.index(wanted) if wanted in parents else 0,
                              format_func=lambda p: p if p in meta else f"{p} (missing from the store)",
                              key="cmp_parent")
        kids = overview.filter(pl.col("parent") == parent).sort("branch_tokens", "branch_step", nulls_last=True)
        # Keyed per parent: switching parents starts from all of the new parent's branches.
        branches = st.multiselect("Branches", kids["run"].to_list(), default=kids["run"].to_list(),
                                  key=f"cmp_branches_{parent}")
        if parent not in meta:
            return parent, branches, []
        prec = meta[parent]["precision"]
        return parent, branches, [orient(parent, b, prec, meta[b]["precision"]) for b in branches]
    c1, c2 = st.columns([1, 2])
    asked = [r for r in (params.get_all("runs") or []) if r in runs]
    low = c1.selectbox("Low-precision run", runs, index=runs.index(asked[0]) if asked else 0, key="cmp_low")
    others = [r for r in runs if r != low]
    default = [r for r in asked[1:] if r in others] or [r for r in others if meta[r]["parent"] == low]
    refs = c2.multiselect("Reference runs", others, default=default, key="cmp_refs")
    return None, refs, [(low, r) for r in refs]


def _messages(summary: pl.DataFrame | None, error: str | None, orphans: pl.DataFrame, parent: str | None) -> None:
    if error:
        st.warning(error)
    if summary is not None:
        for row in summary.filter(pl.col("message").is_not_null()).iter_rows(named=True):
            (st.warning if row["mean_gap"] is None else st.caption)(f"**{row['branch']}**: {row['message']}")
    for row in orphans.iter_rows(named=True):
        if parent is None or row["parent"] != parent:
            st.caption(f"Branch **{row['run']}** names parent **{row['parent']}**, which is not in the store; "
                       "compare it as a free pair under *Any runs*.")


def _series(store: Store, run: str, signal: str, agg: str) -> pl.DataFrame:
    if signal.startswith("layer:"):
        return cached(store, "layer_aggregate", run, signal.removeprefix("layer:"), agg)
    return cached(store, "series", run, signal, max_points=2000)


def _exports(table: pl.DataFrame, metric: str, smoothed: bool) -> None:
    """Download buttons; the files are built only when clicked (deferred callables)."""
    def csv() -> bytes:
        return table.write_csv().encode()

    def parquet() -> bytes:
        buf = io.BytesIO()
        table.write_parquet(buf)
        return buf.getvalue()

    def html() -> str:
        # plotly.js embedded: the file opens on an offline cluster login node too.
        return comparison_figure(table, metric, smoothed=smoothed).to_html(include_plotlyjs=True, full_html=True)

    stem = "comparison-" + metric.replace("/", "_")
    cols = st.columns(4)
    cols[0].download_button("Comparison (CSV)", csv, f"{stem}.csv", "text/csv", on_click="ignore", key="dl_csv")
    cols[1].download_button("Comparison (Parquet)", parquet, f"{stem}.parquet", "application/octet-stream",
                            on_click="ignore", key="dl_parquet")
    cols[2].download_button("Chart (HTML)", html, f"{stem}.html", "text/html", on_click="ignore", key="dl_html")
    if kaleido_available():
        cols[3].download_button("Chart (PNG)", lambda: figure_png(comparison_figure(table, metric, smoothed=smoothed)),
                                f"{stem}.png", "image/png", on_click="ignore", key="dl_png")
    else:
        cols[3].caption("PNG export needs `kaleido` (pip install kaleido).")


def _body(parent: str | None, branches: list[str], pairs: list[tuple[str, str]], metric: str,
          smooth: str | None, span: float, unit: str, signals: list[str], agg: str) -> None:
    store = get_store()
    if store is None:
        return
    key: tuple[Any, ...] = (str(store.root), store.version)
    overview = cached(store, "runs_overview")
    marks = {r["run"]: r["branch_tokens"] for r in overview.iter_rows(named=True)
             if r["run"] in branches and r["branch_tokens"] is not None}
    summary, error = _summary(store, *key, parent, tuple(branches), tuple(() if parent else pairs),
                              metric, smooth, span, unit)
    _messages(summary, error, orphan_branches(store), parent)
    if not pairs:
        if parent is None:
            st.info("Pick a low-precision run and at least one reference run.")
        elif not branches:
            st.info("Pick at least one branch.")
        return

    frames, failed = [], []
    for low, ref in pairs:
        df, msg = _gap(store, *key, low, ref, metric, smooth, span, unit)
        if df is None:
            failed.append(msg)
        else:
            frames.append(df.select(pl.lit(low).alias("low_run"), pl.lit(ref).alias("ref_run"), pl.all()))
    if parent is None:  # free pairs: their messages were not in the summary
        for msg in failed:
            st.warning(msg)
    table = pl.concat(frames) if frames else pl.DataFrame(schema={"low_run": pl.Utf8, "ref_run": pl.Utf8, **GAP_SCHEMA})

    runs = list(dict.fromkeys([r for p in pairs for r in p]))
    loss = {r: _series(store, r, metric, agg) for r in runs}
    fig = loss_figure(loss, metric, title=f"{metric} on tokens")
    fig.update_yaxes(title_text=unit_title(metric))
    add_branch_marks(fig, marks)
    st.plotly_chart(fig, width="stretch", key="cmp_loss")

    if table.height == 0:
        st.info("Nothing to compare: no pair of the chosen runs overlaps in tokens.")
        return
    st.plotly_chart(gap_figure(table, smoothed=smooth is not None,
                               title="Relative gap (L_low - L_ref) / L_ref per branch, with 0.4 % / 1 % bands"),
                    width="stretch", key="cmp_gap")
    if summary is not None and summary.filter(pl.col("mean_gap").is_not_null()).height:
        left, right = st.columns([3, 2])
        left.plotly_chart(summary_figure(summary), width="stretch", key="cmp_summary")
        right.dataframe(summary_table(summary), width="stretch", hide_index=True)

    if signals:
        st.subheader("Other signals on tokens")
        cols = st.columns(2)
        for i, signal in enumerate(signals):
            sig_frames = {r: _series(store, r, signal, agg) for r in runs}
            cols[i % 2].plotly_chart(signal_figure(sig_frames, signal_label(signal, agg), marks, unit_title(signal)),
                                     width="stretch", key=f"cmp_sig_{signal}")
    st.subheader("Export")
    _exports(table, metric, smooth is not None)


def main() -> None:
    """Draw the page."""
    st.title("Compare")
    store = get_store()
    if store is None:
        return
    overview = cached(store, "runs_overview")
    if overview.height == 0:
        st.info("The store has no runs yet: nothing to compare.")
        return
    parent, branches, pairs = _choose_runs(overview)
    runs = list(dict.fromkeys([r for p in pairs for r in p])) or ([parent] if parent else [])

    names: set[str] = set()
    layer_metrics: set[str] = set()
    for r in runs:
        names.update(cached(store, "scalar_names", r))  # type: ignore[arg-type]  # a list, cached alike
        layer_metrics.update(cached(store, "layer_metrics", r)["metric"].to_list())
    metrics = sorted(names) or ["loss/train"]
    c1, c2, c3, c4 = st.columns(4)
    metric = c1.selectbox("Compared scalar", metrics,
                          index=metrics.index("loss/train") if "loss/train" in metrics else 0, key="cmp_metric")
    smooth_label = c2.selectbox("Smoothing", ["none", "EMA", "trailing window"], key="cmp_smooth")
    unit = c3.selectbox("Smoothing over", ["points", "tokens", "steps"], key="cmp_unit")
    span = c4.number_input("Span (EMA span/half-life, window length)", min_value=1.0, value=20.0, step=1.0,
                           key="cmp_span")
    smooth = {"none": None, "EMA": "ema", "trailing window": "window"}[smooth_label]
    options = signal_options(names, layer_metrics, exclude=metric)
    c5, c6, c7 = st.columns([4, 1, 1])
    signals = c5.multiselect("Other signals side by side", options,
                             default=[s for s in options if s in ("loss/mtp_2", "layer:maxvio")][:2], key="cmp_signals")
    agg = c6.selectbox("Layer aggregate", ["max", "median", "mean"], key="cmp_agg")
    live = c7.toggle("Live (10 s)", value=False, key="cmp_live")

    if parent is not None:
        tree = _tree(store, str(store.root), store.version, parent)
        if tree.height:
            with st.expander("Lineage and config changes", expanded=False):
                indent = ["    " * d + ("└ " if d else "") + r for r, d in zip(tree["run"], tree["depth"])]
                shown = tree.with_columns(pl.Series("run", indent))
                st.dataframe(shown, width="stretch", hide_index=True)

    # The charts refresh on their own while a run is live; the pickers above stay put.
    st.fragment(run_every=10 if live else None)(_body)(
        parent, branches, pairs, metric, smooth, float(span), unit, signals, agg)


main()
