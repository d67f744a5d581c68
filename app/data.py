"""Data access for the app: one cached Store per server, queries cached on the store's version."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import polars as pl
import streamlit as st

from healthwatch import query
from healthwatch.store import Store, default_store_path


def store_path() -> Path:
    """The store given on the command line (``-- --store S``) or by ``HEALTHWATCH_STORE``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return default_store_path(args.store or os.environ.get("HEALTHWATCH_STORE"))


@st.cache_resource
def _open(path: str) -> Store:
    return Store(path)


def get_store() -> Store | None:
    """The open store, or None (with a message shown) when there is none yet."""
    path = store_path()
    if not path.is_dir():
        st.info(f"No healthwatch store at `{path}` yet. Start a run with `hw.Monitor(store=...)` or `healthwatch demo`.")
        return None
    try:
        store = _open(str(path))
    except Exception as exc:  # noqa: BLE001 - shown to the user, never a traceback
        st.error(f"Cannot open the store at `{path}`: {exc}")
        return None
    store.refresh()
    return store


@st.cache_data(max_entries=256, show_spinner=False)
def _cached(kind: str, version: int, path: str, args: tuple) -> pl.DataFrame:
    store = _open(path)
    fn = getattr(query, kind)
    pos = [a for a in args if not isinstance(a, tuple)]
    kw = dict(a for a in args if isinstance(a, tuple))
    return fn(store, *pos, **kw)


def cached(store: Store, kind: str, *args: object, **kwargs: object) -> pl.DataFrame:
    """Run ``healthwatch.query.<kind>`` cached on ``(store.version, arguments)``: a refresh without
    new segments re-reads nothing."""
    key = tuple(args) + tuple(sorted(kwargs.items()))
    return _cached(kind, store.version, str(store.root), key)


def alerts_state(store: Store) -> pl.DataFrame:
    """Latest state per alert fingerprint and run (empty when no alert was ever recorded)."""
    return store.sql(
        "SELECT run, alert, severity, state, step, tokens, layer, value, wall_time FROM alerts "
        "QUALIFY row_number() OVER (PARTITION BY run, fingerprint ORDER BY wall_time DESC) = 1 ORDER BY wall_time DESC"
    ).pl()
