"""Data access for the app: thin cached wrappers over :mod:`healthwatch.query`. No SQL here.

* ``get_store`` opens one :class:`~healthwatch.store.Store` per path for the whole server
  (``st.cache_resource``) and refreshes its listing once per script run.
* Every query result goes through ONE cache (:func:`_cached`), keyed on a cheap signature: the
  run's table directories' modification times for per-run queries (:func:`cached_run`), the
  store's table directories for store-wide ones (:func:`cached`). A writer appending to run A
  never invalidates run B, and a rerun without new segments re-reads nothing.
* Line charts read through the server-wide :class:`~healthwatch.query.SeriesCache`, which
  updates incrementally as the run grows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import streamlit as st

from healthwatch import query
from healthwatch.query import (  # noqa: F401 - re-exported for the pages
    LIVE_S,
    MAX_POINTS,
    WIDTHS,
    Agg,
    Crossing,
    SeriesCache,
    Signal,
    Timeline,
    attempts,
    bucket_means,
    expert_load_at,
    expert_load_steps,
    first_crossing,
    heatmap,
    last_checkpoint_before,
    layer_info,
    layer_profiles,
    markers,
    path_for,
    path_span,
    profile_steps,
    run_overview,
    run_signature,
    scalar_names,
    trailing_z,
    tree_order,
)
from healthwatch.store import Store, default_store_path
from healthwatch.store.fs import store_exists

#: How old the store's listing may be when a cache miss queries it.
_FRESH_S = 0.5


def store_path() -> Path:
    """The store given on the command line (``-- --store S``), by ``HEALTHWATCH_STORE``, or the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return default_store_path(args.store or os.environ.get("HEALTHWATCH_STORE"))


@st.cache_resource(show_spinner=False)
def _open(path: str) -> Store:
    # get_store() refreshes once per script run; queries need not re-list the store each time.
    return Store(path, auto_refresh=False)


def get_store(quiet: bool = False) -> Store | None:
    """The open store (refreshed), or None after showing why there is none (unless ``quiet``)."""
    path = store_path()
    if not store_exists(path):  # a directory, or an s3:// store
        if not quiet:
            st.info(f"No healthwatch store at `{path}` yet. Start a run with `hw.Monitor(store=...)`, "
                    "or `healthwatch demo` for a demo store, then reload.")
        return None
    try:
        store = _open(str(path))
        store.refresh()
    except Exception as exc:  # noqa: BLE001 - a message, never a traceback
        if not quiet:
            st.error(f"Cannot open the store at `{path}`: {exc}")
        return None
    return store


# --------------------------------------------------------------------------------------------
# the one cache


def _resolve(name: str) -> Callable[..., Any]:
    fn = getattr(query, name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"no query named {name!r} in healthwatch.query")
    return fn


@st.cache_data(max_entries=1024, show_spinner=False)
def _cached(name: str, sig: tuple, path: str, args: tuple, kwargs: tuple) -> Any:
    store = _open(path)
    store.refresh_if_older(_FRESH_S)  # the signature may have seen files newer than the views
    return _resolve(name)(store, *args, **dict(kwargs))


def cached(store: Store, kind: str, *args: Any, **kwargs: Any) -> Any:
    """``healthwatch.query.<kind>(store, *args, **kwargs)`` cached on the store's signature."""
    return _cached(kind, query.store_signature(store), str(store.root), tuple(args), tuple(sorted(kwargs.items())))


def cached_run(store: Store, run: str, fn: Callable[..., Any] | str, *args: Any,
               tables: Sequence[str] = ("scalars", "layer_stats", "attempts"), **kwargs: Any) -> Any:
    """``healthwatch.query.<fn>(store, run, *args, **kwargs)`` cached on ``run``'s own signature."""
    name = fn if isinstance(fn, str) else fn.__name__
    sig = run_signature(store, run, tuple(tables))
    return _cached(name, sig, str(store.root), (run, *args), tuple(sorted(kwargs.items())))


# --------------------------------------------------------------------------------------------
# pages' helpers


def is_live(last_write: float | None, now: float | None = None) -> bool:
    """Whether a run with this last write time counts as live (see also ``run_overview()['status']``)."""
    return query.status(last_write, False, now) == "live"


#: Points per trace of a half-width chart (two side by side, ~600 px each): a minimum and a maximum per
#: ~1.2 px column, so nothing a screen can show is lost, and about half the points the browser draws.
HALF_POINTS = MAX_POINTS // 2


@st.cache_resource(show_spinner=False)
def series_cache(max_points: int = MAX_POINTS) -> SeriesCache:
    """The server-wide :class:`SeriesCache` drawing at most ``max_points`` points per trace."""
    return SeriesCache(max_points)


def series(store: Store, run: str, signals: Sequence[Signal], attempt: int | None = None,
           max_points: int = MAX_POINTS) -> pl.DataFrame:
    """Downsampled points of ``signals`` of ``run`` (with superseded rows flagged), read incrementally;
    at most ``max_points`` per trace (each bucket's minimum and maximum, so spikes stay)."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2 (a minimum and a maximum), got {max_points}")
    return series_cache(int(max_points)).get(store, run, signals, attempt)


def alert_transitions(store: Store, run: str | None = None) -> pl.DataFrame:
    """Every alert state transition (event-sourced rows), oldest first."""
    return cached(store, "alert_transitions", run)


def alert_states(store: Store) -> pl.DataFrame:
    """The latest state of every alert instance (run x fingerprint)."""
    df = alert_transitions(store)
    if df.height == 0:
        return df
    return df.sort("wall_time", "step").group_by("run", "fingerprint", maintain_order=True).last()


def run_names(store: Store) -> list[str]:
    """Runs of the store, oldest first (reads only the ``runs`` table)."""
    return cached(store, "run_names")


def runs_table(store: Store) -> pl.DataFrame:
    """All runs with lineage, health (firing/pending alert counts) and status (finished/live/idle)."""
    df = cached(store, "runs_overview")
    if df.height == 0:
        return df
    states = alert_states(store)
    counts = (states.group_by("run").agg(
        (pl.col("state") == "firing").sum().alias("firing"),
        (pl.col("state") == "pending").sum().alias("pending"),
        pl.col("alert").filter(pl.col("state") == "firing").unique().sort().str.join(", ").alias("firing_alerts"),
    ) if states.height else pl.DataFrame(schema={"run": pl.Utf8, "firing": pl.UInt32, "pending": pl.UInt32,
                                                 "firing_alerts": pl.Utf8}))
    now = time.time()
    return (df.join(counts, on="run", how="left")
            .with_columns(pl.col("firing").fill_null(0), pl.col("pending").fill_null(0),
                          pl.struct("last_write", "finished").map_elements(
                              lambda r: query.status(r["last_write"], bool(r["finished"]), now),
                              return_dtype=pl.Utf8).alias("status"))
            .with_columns((pl.col("status") == "live").alias("live")))
