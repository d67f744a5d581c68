"""The query cache's signatures on an ``s3://`` store: one LIST walk per table, shared, and still exact.

Against a real SeaweedFS server (``conftest.seaweed``). Before, every ``run_signature`` paid one
LIST walk per ``table=/run=`` prefix and ``store_signature`` one per table and per run: a warm Run
page made 133 LIST calls (docs/scale.md).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from healthwatch.schema import TABLES


def _rows(steps: np.ndarray) -> pa.Table:
    return pa.table({"attempt": np.ones(steps.size, np.int32), "step": steps, "tokens": steps * 10,
                     "name": ["loss/train"] * steps.size, "value": steps * 0.5, "wall_time": np.ones(steps.size)},
                    schema=TABLES["scalars"])


def test_signatures_share_one_walk_per_table_and_change_with_the_store(s3_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from healthwatch.query import runs as qruns
    from healthwatch.schema import TABLES as ALL
    from healthwatch.store import StoreWriter, open_store
    from healthwatch.store import fs as store_fs

    monkeypatch.setattr(qruns, "SIGNATURE_TTL_S", 60.0)  # nothing expires during the counted calls
    writers = {run: StoreWriter(s3_root, run, rollups=False) for run in ("a", "b", "c")}
    for w in writers.values():
        w.write("scalars", _rows(np.arange(0, 10)))
    store = open_store(s3_root)
    fs = store_fs.fs_for(s3_root)
    try:
        qruns._walks.clear()
        before = fs.stats.snapshot()["list"]  # type: ignore[attr-defined]
        sigs = {run: qruns.run_signature(store, run) for run in writers for _ in range(5)}
        whole = qruns.store_signature(store)
        lists = fs.stats.snapshot()["list"] - before  # type: ignore[attr-defined]
        # One walk per table (each fits one LIST page here), however many runs and calls.
        assert lists == len(ALL), lists
        assert len(set(sigs.values())) == 3  # each run its own key

        # A new segment of run "a" changes a's signature and the store's, not b's (once the walk is redone).
        writers["a"].write("scalars", _rows(np.arange(10, 20)))
        qruns._walks.clear()
        assert qruns.run_signature(store, "a") != sigs["a"]
        assert qruns.run_signature(store, "b") == sigs["b"]
        assert qruns.store_signature(store) != whole

        # Within the TTL a signature is reused (may lag a new segment by that long), then refreshed.
        monkeypatch.setattr(qruns, "SIGNATURE_TTL_S", 0.3)
        now_b = qruns.run_signature(store, "b")
        writers["b"].write("scalars", _rows(np.arange(10, 20)))
        time.sleep(0.5)
        assert qruns.run_signature(store, "b") != now_b
    finally:
        store.close()
