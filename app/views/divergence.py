"""Divergence page: the anatomy of a divergence.

Every signal is normalised against its own trailing window (robust z-score: distance from the
trailing median in units of 1.4826·MAD) and drawn on one axis. The first bucket where a signal
leaves the ±k band for a few buckets in a row is its *crossing*; the page ranks signals by
crossing, says how many steps and tokens each moved before the train loss, and proposes the last
checkpoint before the first mover as the rollback point. By default it analyses the diverged
timeline of the latest rolled-back attempt, since that is where the divergence happened.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import streamlit as st

from healthwatch.app import charts
from healthwatch.app.data import (
    Crossing,
    Signal,
    attempts,
    bucket_means,
    cached_run,
    first_crossing,
    get_store,
    last_checkpoint_before,
    layer_info,
    path_span,
    run_names,
    scalar_names,
    trailing_z,
)
from healthwatch.band import BAND_WINDOW, MAD_TO_SIGMA, band_exit
from healthwatch.store import Store

LOSS = "loss/train"
SKIP_SCALARS = ("lr", "monitor/")


def candidate_signals(names: list[str], layers: pl.DataFrame) -> dict[str, Signal]:
    """Signals worth normalising: losses, gradient norms, other scalars except the learning rate
    and monitor counters, and per-layer metrics aggregated over layers (early layers separately
    for residual norms, which rise there first)."""
    out: dict[str, Signal] = {}
    for n in names:
        if not any(n == s or n.startswith(s) for s in SKIP_SCALARS if s.endswith("/")) and n not in SKIP_SCALARS:
            out[n] = Signal(n)
    if layers.height:
        for metric in sorted(set(layers["metric"].to_list())):
            ls = sorted(set(layers.filter(pl.col("metric") == metric)["layer"].to_list()))
            out[f"{metric} max over layers"] = Signal(metric, "max")
            if metric in ("resid_rms", "resid_rms_max", "wgrad_norm") and len(ls) >= 4:
                q = ls[: max(1, len(ls) // 4)]
                out[f"{metric} mean, first quarter (layers {q[0]}–{q[-1]})"] = Signal(metric, "mean", (q[0], q[-1]))
            if metric == "maxvio":
                out["maxvio median over layers"] = Signal(metric, "median")
    return out


DEFAULTS = ("loss/", "grad_norm/total", "maxvio max", "resid_rms mean, first", "resid_rms max", "wgrad_norm max",
            "dead_experts max")


def _z_text(z: float) -> str:
    """A z-score for the table: flat trailing windows (MAD 0) give huge z, shown as a bound."""
    if not np.isfinite(z):
        return "non-finite value" if np.isinf(z) else "n/a"
    if abs(z) >= 1e5:
        return f"{'≥' if z > 0 else '≤'} {'' if z > 0 else '−'}1e5 (flat window)"
    return f"{z:.3g}"


def _loss_band_exit(part: pl.DataFrame) -> Crossing | None:
    """The train loss "moves" where it leaves its band (:func:`healthwatch.band.band_exit`: above the
    median of the previous 50 points + 4·1.4826·MAD), the definition the early-warning benchmark and
    ``healthwatch demo`` measure leads against. Points are the page's buckets (1 step each up to
    1,000 steps); a short range uses a third of its points as the window."""
    n = part.height
    window = min(BAND_WINDOW, max(2, n // 3))
    ex = band_exit(part["step"].to_numpy(), part["value"].to_numpy(), None, tokens=part["tokens"].to_numpy(),
                   window=window)
    if ex is None:
        return None
    z = (ex.value - ex.median) / (MAD_TO_SIGMA * ex.mad) if ex.mad > 0 else float("inf")
    return Crossing(LOSS, ex.step, ex.tokens, z, "up")


def _paths(store: Store, run: str) -> tuple[list[int | None], dict[int | None, str], int]:
    att = cached_run(store, run, attempts, tables=("attempts",))
    options: list[int | None] = [None]
    labels: dict[int | None, str] = {None: "current timeline (effective rows)"}
    default = 0
    for row in att.iter_rows(named=True):
        if row["superseded_from"] is not None:
            options.append(row["attempt"])
            labels[row["attempt"]] = (f"attempt {row['attempt']}: diverged timeline, superseded from step "
                                      f"{row['superseded_from']:,} by a rollback")
            default = len(options) - 1  # the latest rolled-back attempt is where the divergence is
    return options, labels, default


def _analysis(store: Store, run: str, attempt: int | None, chosen: dict[str, Signal], lo: int, hi: int,
              buckets: int, window: int, k: float, persist: int, x: str) -> None:
    sig_of = {s.key: name for name, s in chosen.items()}
    df = cached_run(store, run, bucket_means, tuple(chosen.values()), attempt, lo, hi, buckets,
                    tables=("scalars", "layer_stats", "attempts"))
    if df.height == 0:
        st.info("No rows in this range.")
        return
    frames: dict[str, pl.DataFrame] = {}
    crossings: dict[str, Crossing] = {}
    for key, part in df.partition_by("sig", as_dict=True).items():
        key = key[0] if isinstance(key, tuple) else key
        name = sig_of.get(key, key)
        part = part.sort("step")
        z = trailing_z(part["value"].to_numpy(), window)
        frames[name] = part.with_columns(pl.Series("z", z))
        if name == LOSS:
            c = _loss_band_exit(part)
        else:
            c = first_crossing(part["step"].to_numpy(), part["tokens"].to_numpy(), z, k, persist, name)
        if c is not None:
            crossings[name] = c
    frames = {n: frames[n] for n in chosen if n in frames}
    n_buckets = max(f.height for f in frames.values())
    if n_buckets <= window + persist:
        st.info(f"Only {n_buckets} buckets in this range: the trailing window of {window} needs more. "
                "Widen the range, or shorten the window.")
    ranked = sorted(crossings.values(), key=lambda c: (c.step, c.signal))
    loss = crossings.get(LOSS)
    first = ranked[0] if ranked else None
    ck = last_checkpoint_before(store, run, attempt, first.step) if first else None

    marks = []
    if first is not None:
        marks.append((first.step if x == "step" else first.tokens, f"first mover: {first.signal}", "#9467bd"))
    if loss is not None and loss is not first:
        marks.append((loss.step if x == "step" else loss.tokens, "train loss", "#d62728"))
    if ck is not None:
        marks.append((ck["step"] if x == "step" else ck["tokens"], "rollback point", "#2ca02c"))
    st.plotly_chart(charts.zscores(frames, x, k, crossings, marks), width="stretch", key="zchart")

    if first is None:
        st.success(f"No signal left its ±{k:g} band for {persist} buckets in a row in this range.")
        return
    if loss is None:
        st.warning(f"**{first.signal}** moved first (step {first.step:,}); the train loss has not left its band "
                   "in this range, so this may be an early warning rather than a divergence yet.")
    elif first.signal == LOSS:
        st.warning(f"The train loss itself moved first (step {loss.step:,}): no other signal led it in this range.")
    else:
        lead = loss.step - first.step
        tok = (f" / {charts._si(loss.tokens - first.tokens)} tokens"
               if loss.tokens is not None and first.tokens is not None else "")
        st.warning(f"**{first.signal}** moved first, at step {first.step:,}: **{lead:,} steps{tok}** before the "
                   f"train loss (step {loss.step:,}).")
    if ck is not None:
        st.success(f"Rollback suggestion: the checkpoint at **step {ck['step']:,}**"
                   + (f" ({charts._si(ck['tokens'])} tokens)" if ck["tokens"] is not None else "")
                   + f", {first.step - ck['step']:,} steps before the first mover.")
    else:
        st.info("No checkpoint event before the first mover on this timeline (log them with "
                "`mon.event('checkpoint', step=...)`).")

    table = []
    for c in ranked:
        table.append({
            "signal": c.signal,
            "first crossing (step)": c.step,
            "tokens": charts._si(c.tokens) if c.tokens is not None else "",
            "z at crossing": _z_text(c.z),
            "direction": c.direction,
            "lead over train loss (steps)": (loss.step - c.step) if loss is not None else None,
            "lead (tokens)": charts._si(loss.tokens - c.tokens) if loss is not None and loss.tokens is not None
            and c.tokens is not None else "",
        })
    quiet = [n for n in frames if n not in crossings]
    st.dataframe(pl.DataFrame(table), width="stretch", hide_index=True)
    if quiet:
        st.caption("Stayed inside the band: " + ", ".join(quiet))


def main() -> None:
    """Draw the page."""
    st.title("Divergence")
    store = get_store()
    if store is None:
        return
    runs = run_names(store)
    if not runs:
        st.info("The store has no runs yet.")
        return
    wanted = st.query_params.get("run")
    c1, c2, c3 = st.columns([2, 4, 2])
    run = c1.selectbox("Run", runs, index=runs.index(wanted) if wanted in runs else len(runs) - 1, key="div_run")
    st.query_params["run"] = run
    options, labels, default = _paths(store, run)
    attempt = c2.selectbox("Timeline", options, index=default, format_func=labels.get, key=f"div_path_{run}",
                           help="A rolled-back attempt's timeline includes the rows the rollback superseded.")
    x = c3.radio("x axis", ["step", "tokens"], horizontal=True, key="div_x")
    span = path_span(store, run, attempt)
    if span is None:
        st.info(f"Run `{run}` has no rows on this timeline yet.")
        return
    names = cached_run(store, run, scalar_names)
    layers = cached_run(store, run, layer_info)
    cands = candidate_signals(names, layers)
    default_sigs = [n for n in cands if any(n.startswith(d) for d in DEFAULTS)] or list(cands)
    picked = st.multiselect("Signals", list(cands), default=default_sigs, key=f"div_sigs_{run}")
    lo, hi = span
    with st.expander("Range and detector settings", expanded=False):
        s1, s2, s3, s4 = st.columns(4)
        rng = (lo, hi) if hi > lo else (lo, lo + 1)
        lo, hi = s1.slider("Steps", rng[0], rng[1], rng, key=f"div_rng_{run}_{attempt}") if hi > lo else (lo, hi)
        window = s2.number_input("Trailing window (buckets)", 5, 500, 30, key="div_win")
        k = s3.number_input("Threshold k (robust z)", 1.0, 100.0, 6.0, 0.5, key="div_k")
        persist = s4.number_input("Must hold for (buckets)", 1, 50, 3, key="div_persist")
        buckets = st.select_slider("Time buckets", [250, 500, 1000, 2000], value=1000, key="div_buckets",
                                   help="Signals are averaged into this many equal step buckets first.")
    if hi - lo + 1 < 8:
        st.info(f"Run `{run}` has only {hi - lo + 1} step(s) on this timeline: a trailing window needs more.")
        return
    if not picked:
        st.info("Pick at least one signal.")
        return
    chosen = {n: cands[n] for n in picked}
    if LOSS in cands and LOSS not in chosen:
        chosen[LOSS] = cands[LOSS]  # the reference every lead is measured against
    buckets = int(min(buckets, hi - lo + 1))
    window = int(min(window, max(2, buckets // 3)))
    st.caption(f"Steps {lo:,}–{hi:,} in {buckets:,} buckets of {max(1, -(-(hi - lo + 1) // buckets)):,} step(s); "
               f"z = (value − trailing median) / (1.4826·MAD) over the previous {window} buckets; "
               f"crossing = |z| ≥ {k:g} for {persist} bucket(s); the train loss's crossing is its band exit "
               f"(above the median of the previous {BAND_WINDOW} buckets + 4·1.4826·MAD, healthwatch.band).")
    _analysis(store, run, attempt, chosen, lo, hi, buckets, window, float(k), int(persist), x)


main()
