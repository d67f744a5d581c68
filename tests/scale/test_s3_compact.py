"""``healthwatch compact`` on an ``s3://`` store: merge leases taken with conditional PUTs.

Everything runs against a real SeaweedFS server on 127.0.0.1 (``conftest.seaweed``); nothing mocks
the client. Expected rows come from the inputs written here (and, for rollups, from the same
inputs compacted on local disk), never from the store under test.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from healthwatch.schema import TABLES

RUN = "lease-run"
LAYERS = 4
ROLLBACK_AT = 150  # attempt 2 restarts here: attempt 1's rows from this step on are superseded


def _layer_rows(attempt: int, steps: np.ndarray, layers: list[int]) -> pa.Table:
    """Layer rows whose values encode (attempt, step, layer), with NaN, ±Inf and -0.0 among them."""
    s = np.repeat(steps, len(layers))
    lay = np.tile(np.asarray(layers, np.int32), steps.size)
    value = attempt * 1e6 + s * 10.0 + lay + 0.125
    value = np.where(s % 37 == 0, np.nan, value)
    value = np.where(s % 41 == 0, np.inf, value)
    value = np.where(s % 43 == 0, -np.inf, value)
    value = np.where(s % 47 == 0, -0.0, value)
    return pa.table({"attempt": np.full(s.size, attempt, np.int32), "step": s, "tokens": s * 100, "layer": lay,
                     "layer_type": ["moe"] * s.size, "metric": ["maxvio"] * s.size, "value": value},
                    schema=TABLES["layer_stats"])


def _scalar_rows(attempt: int, steps: np.ndarray) -> pa.Table:
    value = np.where(steps % 31 == 0, np.nan, 2.0 + attempt + steps / 1000.0)
    return pa.table({"attempt": np.full(steps.size, attempt, np.int32), "step": steps, "tokens": steps * 100,
                     "name": ["loss/train"] * steps.size, "value": value, "wall_time": np.full(steps.size, 1.0)},
                    schema=TABLES["scalars"])


def _write_store(root: str, flushes: int = 8, fanout: int = 4) -> list[tuple[int, int, int, int]]:
    """Two attempts x two writers (layers split between ranks), several flushes each, no live rollups.

    The writers merge their own segments on the way (fan-out ``fanout``), so the store holds
    merged and unmerged segments of four owners. Returns the effective (step, layer, attempt, value
    bits) keys the inputs define (attempt 1 superseded from ``ROLLBACK_AT`` on).
    """
    from healthwatch.store import StoreWriter

    expected: dict[tuple[int, int], tuple[int, int]] = {}
    spans = {1: np.arange(0, 240), 2: np.arange(ROLLBACK_AT, 300)}
    for attempt, steps in spans.items():
        writers = [StoreWriter(root, RUN, attempt=attempt, rank=r, merge_fanout=fanout, rollups=False) for r in (0, 1)]
        w0 = writers[0]
        w0.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["bf16"],
                          "config": ["{}"], "created": [1.0], "schema_version": ["1.0"]})
        w0.write("attempts", {"attempt": [attempt], "start_step": [int(steps[0])], "started_at": [1.0 * attempt],
                              "host": ["h"], "reason": ["start" if attempt == 1 else "rollback"],
                              "schema_version": ["1.0"]})
        for part in np.array_split(steps, flushes):
            for rank, w in enumerate(writers):
                w.write("layer_stats", _layer_rows(attempt, part, [la for la in range(LAYERS) if la % 2 == rank]))
                w.compact_own("layer_stats")
            w0.write("scalars", _scalar_rows(attempt, part))
            w0.compact_own("scalars")
        if attempt == 2:  # the last attempt ended: compaction may roll it up
            w0.write("events", {"attempt": [2], "step": [int(steps[-1])], "tokens": [int(steps[-1]) * 100],
                                "kind": ["close"], "message": [""], "wall_time": [2.0]})
        for w in writers:
            w.close()
        for part in [steps]:
            t = _layer_rows(attempt, part, list(range(LAYERS)))
            for st, la, v in zip(t["step"].to_pylist(), t["layer"].to_pylist(), t["value"].to_numpy(), strict=True):
                if attempt == 2 or st < ROLLBACK_AT:
                    expected[(st, la)] = (attempt, int(np.float64(v).view(np.int64)))
    return sorted((st, la, a, bits) for (st, la), (a, bits) in expected.items())


def _effective(root: str) -> list[tuple[int, int, int, int]]:
    from healthwatch.store import open_store

    store = open_store(root)
    try:
        rows = store.sql("SELECT step, layer, attempt, value FROM layer_stats_effective WHERE run = ? "
                         "ORDER BY step, layer", [RUN]).fetchall()
    finally:
        store.close()
    return [(int(s), int(la), int(a), int(np.float64(v).view(np.int64))) for s, la, a, v in rows]


def _rollups(root: str, table: str) -> list[tuple]:
    from healthwatch.store import open_store

    store = open_store(root)
    try:
        cols = [c for c in TABLES[table].names]
        rows = store.sql(f"SELECT {', '.join(cols)} FROM {table} WHERE run = ? ORDER BY ALL", [RUN]).fetchall()
    finally:
        store.close()
    out = []
    for r in rows:
        rec = dict(zip(cols, r, strict=True))
        # Where several rows hold the extreme (NaN or ±Inf, repeated in the inputs), which of their steps
        # the rollup names is a tie the rollup SQL does not break: compare the value, not that step.
        for ext in ("vmin", "vmax"):
            if not np.isfinite(rec[ext]):
                rec[f"step_{ext}"] = rec[f"tokens_{ext}"] = None
        # floats as bits: NaN compares equal to NaN, -0.0 differs from 0.0
        out.append(tuple(int(np.float64(v).view(np.int64)) if isinstance(v, float) else v for v in rec.values()))
    return out


def _segments(root: str, table: str) -> list[str]:
    from healthwatch.store import fs as store_fs
    from healthwatch.store.segments import list_segments, table_dir

    return [p.name for p in list_segments(table_dir(store_fs.root_path(root), table, RUN))]


def test_compact_s3_keeps_effective_rows_bit_exact_and_rolls_up_as_on_disk(s3_root: str, tmp_path: Path) -> None:
    from healthwatch.store.compact import compact_store

    expected = _write_store(s3_root)
    local = str(tmp_path / "disk")
    assert _write_store(local) == expected
    assert _effective(s3_root) == expected  # before: what the writers published
    before = _segments(s3_root, "layer_stats")
    assert len({n.split("-")[0] for n in before}) == 4 and len(before) > 4  # four owners, several objects

    out = compact_store(s3_root)
    compact_store(local)

    assert out[RUN]["layer_stats"] == len(before)
    assert len(_segments(s3_root, "layer_stats")) == 1 and len(_segments(s3_root, "scalars")) == 1
    assert _effective(s3_root) == expected  # counted and bit-exact (NaN, ±Inf, -0.0), superseded rows hidden
    for table in ("layer_stats_rollup", "scalars_rollup"):
        got = _rollups(s3_root, table)
        assert got and got == _rollups(local, table), table  # both attempts rolled up, as on disk
    # No lease is left behind, and a second compaction finds nothing to merge.
    from healthwatch.store import fs as store_fs

    names = store_fs.FS.list(f"{s3_root}/table=layer_stats/run={RUN}")
    assert not [n for n in names if n.endswith(".lock")]
    assert compact_store(s3_root)[RUN] == {}
    assert _effective(s3_root) == expected


def test_compact_cli_on_s3(s3_root: str) -> None:
    expected = _write_store(s3_root, flushes=3)
    res = subprocess.run([sys.executable, "-m", "healthwatch.cli", "compact", "--store", s3_root],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"{RUN}" in res.stdout and "layer_stats:" in res.stdout
    assert len(_segments(s3_root, "layer_stats")) == 1
    assert _effective(s3_root) == expected


def test_compactor_racing_live_writers_loses_and_duplicates_nothing(s3_root: str) -> None:
    """Two live writers flush and self-merge (fan-out 2: a merge every other flush) while compactions run."""
    from healthwatch.store import StoreWriter
    from healthwatch.store import fs as store_fs
    from healthwatch.store.compact import compact_run

    root = store_fs.root_path(s3_root)
    flushes, per_flush = 24, 5
    errors: list[BaseException] = []
    merges = [0, 0]

    def live(rank: int) -> None:
        try:
            w = StoreWriter(s3_root, RUN, attempt=1, rank=rank, merge_fanout=2, rollups=False)
            for i in range(flushes):
                steps = np.arange(i * per_flush, (i + 1) * per_flush)
                w.write("layer_stats", _layer_rows(1, steps, [rank]))
                merges[rank] += w.compact_own("layer_stats")
            w.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    StoreWriter(s3_root, RUN, rollups=False).write(
        "attempts", {"attempt": [1], "start_step": [0], "started_at": [1.0], "host": ["h"], "reason": ["start"],
                     "schema_version": ["1.0"]})
    threads = [threading.Thread(target=live, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    compactions = 0
    while any(t.is_alive() for t in threads):
        if compact_run(root, RUN, rollups=False).get("layer_stats"):
            compactions += 1
    for t in threads:
        t.join()
    assert not errors, errors
    compact_run(root, RUN, rollups=False)  # and once more after the writers are done

    rows = _effective(s3_root)
    keys = [(s, la) for s, la, _a, _b in rows]
    want = [(s, la) for s in range(flushes * per_flush) for la in (0, 1)]
    assert len(keys) == len(want) and sorted(keys) == want  # none lost, none twice
    t = _layer_rows(1, np.arange(flushes * per_flush), [0, 1])
    bits = {(s, la): int(np.float64(v).view(np.int64))
            for s, la, v in zip(t["step"].to_pylist(), t["layer"].to_pylist(), t["value"].to_numpy(), strict=True)}
    assert all(b == bits[(s, la)] for s, la, _a, b in rows)
    assert compactions >= 1 and sum(merges) >= 1  # both kinds of merger did run
    assert len(_segments(s3_root, "layer_stats")) == 1


def test_stale_lease_is_broken_by_exactly_one_of_two_contenders(s3_env: object, s3_root: str) -> None:
    from healthwatch.objectstore import LeaseLost, S3Lease
    from healthwatch.store import fs as store_fs

    fs = store_fs.fs_for(s3_root)
    for round_ in range(3):
        path = f"{s3_root}/table=layer_stats/run={RUN}/.merge-w{round_}.lock"
        gone = S3Lease(fs, path, "dead-holder", lease_s=1.0)  # type: ignore[arg-type]
        assert gone.acquire()
        # The holder stops renewing (as if killed). Until the lease expires, nobody may take it.
        assert not S3Lease(fs, path, "early", lease_s=1.0).acquire()  # type: ignore[arg-type]
        time.sleep(1.0 + 2.0 + 1.5)  # lease + slack + the servers' one-second time resolution
        barrier = threading.Barrier(2)
        won: list[str] = []

        def contend(name: str, path: str = path, barrier: threading.Barrier = barrier, won: list[str] = won) -> None:
            lease = S3Lease(fs, path, name, lease_s=30.0)  # type: ignore[arg-type]
            barrier.wait()
            if lease.acquire():
                won.append(name)

        threads = [threading.Thread(target=contend, args=(f"c{i}",)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, won
        with pytest.raises(LeaseLost):  # the old holder, back from the dead, learns it lost the lease
            gone.renew()


def test_live_lease_is_respected_by_writers_and_compactor(s3_root: str) -> None:
    from healthwatch.objectstore import MergeSkipped, S3Lease, merge_s3, owner_lease_name, segment_owner
    from healthwatch.store import StoreWriter
    from healthwatch.store import fs as store_fs
    from healthwatch.store.compact import _compact_run_s3
    from healthwatch.store.merge import merge_files
    from healthwatch.store.segments import MANIFEST_PREFIX

    w = StoreWriter(s3_root, RUN, attempt=1, rank=0, merge_fanout=64, rollups=False)
    for i in range(4):
        w.write("layer_stats", _layer_rows(1, np.arange(i * 5, (i + 1) * 5), [0]))
    directory = f"{s3_root}/table=layer_stats/run={RUN}"
    names = _segments(s3_root, "layer_stats")
    owner = segment_owner(names[0])
    fs = store_fs.fs_for(s3_root)
    other = S3Lease(fs, f"{directory}/{owner_lease_name(owner)}", "another-compactor", lease_s=60.0)  # type: ignore[arg-type]
    assert other.acquire()
    try:
        assert not S3Lease(fs, other.path, "me", lease_s=60.0).acquire()  # type: ignore[arg-type]
        with pytest.raises(MergeSkipped):  # the writer's own merge waits for a later flush
            merge_s3(directory, [f"{directory}/{n}" for n in names[:2]], f"{owner}-000000099-L1.parquet",
                     "layer_stats", merge=merge_files, manifest_prefix=MANIFEST_PREFIX)
        root = store_fs.root_path(s3_root)
        assert _compact_run_s3(root, RUN, rollups=False, wait_s=0.0) == {}  # the compactor leaves them
        assert sorted(_segments(s3_root, "layer_stats")) == sorted(names)
    finally:
        other.release()
    again = S3Lease(fs, other.path, "me", lease_s=60.0)  # type: ignore[arg-type]
    assert again.acquire()  # released: free again
    again.release()


def test_compact_refuses_a_server_that_ignores_if_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """Create-only PUTs enforced, ``If-Match`` silently dropped: writers may write there, compaction may not."""
    from s3servers import moto_behind_ignoring_proxy

    from healthwatch.objectstore import S3FS, ConditionalWriteUnsupportedError, S3Settings
    from healthwatch.store.compact import compact_store

    with moto_behind_ignoring_proxy(monkeypatch, "hwcompact", dropped=("if-match",)) as (_port, proxy):
        monkeypatch.setenv("HEALTHWATCH_S3_ENDPOINT", proxy.endpoint)
        root = "s3://hwcompact/store"
        expected = _write_store(root, flushes=2)  # the writers' If-None-Match probe passes through the proxy
        fs = S3FS("hwcompact", S3Settings(endpoint_url=proxy.endpoint))
        before = sorted(fs.walk(root))
        with pytest.raises(ConditionalWriteUnsupportedError) as err:
            compact_store(root)
        msg = str(err.value)
        assert proxy.endpoint in msg and "If-Match" in msg and "compact" in msg
        res = subprocess.run([sys.executable, "-m", "healthwatch.cli", "compact", "--store", root],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "does not enforce If-Match" in " ".join(res.stderr.split()), res.stderr
        assert sorted(fs.walk(root)) == before  # nothing was merged, deleted or left behind
        assert _effective(root) == expected


def test_two_compactors_at_once_split_the_owners_and_duplicate_nothing(s3_root: str) -> None:
    from healthwatch.store import fs as store_fs
    from healthwatch.store.compact import _compact_run_s3

    expected = _write_store(s3_root, flushes=4)
    root = store_fs.root_path(s3_root)
    barrier = threading.Barrier(2)
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def compactor() -> None:
        try:
            barrier.wait()
            results.append(_compact_run_s3(root, RUN, rollups=False, wait_s=0.0))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=compactor) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 2 and any(r.get("layer_stats") for r in results)
    assert _effective(s3_root) == expected  # whatever each merged, no row twice, none lost
    _compact_run_s3(root, RUN, rollups=False)  # a later compaction merges what either left
    assert len(_segments(s3_root, "layer_stats")) == 1
    assert _effective(s3_root) == expected


def test_a_merge_killed_after_publishing_its_target_is_finished_by_the_next_merger(s3_root: str, tmp_path: Path) -> None:
    """The state a merger killed between its target PUT and deleting its sources leaves: target + manifest +
    sources. Readers hide the sources; the next compaction deletes them before it retires the target (else
    the manifest would stop hiding them and their rows would count twice)."""
    import json

    from healthwatch.store import fs as store_fs
    from healthwatch.store.compact import compact_store
    from healthwatch.store.merge import merge_files

    expected = _write_store(s3_root, flushes=4)
    fs = store_fs.fs_for(s3_root)
    directory = f"{s3_root}/table=layer_stats/run={RUN}"
    names = sorted(_segments(s3_root, "layer_stats"))[:2]
    work = tmp_path / "m"
    work.mkdir()
    for n in names:
        (work / n).write_bytes(fs.read_bytes(f"{directory}/{n}"))
    target = "deadmerger0-000000001-L9.parquet"
    merged = merge_files(work, [work / n for n in names], target, "layer_stats")
    fs.publish_bytes(directory, "_merge-killed.json", json.dumps({"target": target, "sources": names}).encode())
    fs.publish_bytes(directory, target, merged.read_bytes())  # ... and killed here: sources still there
    listed = store_fs.FS.list(directory)
    assert all(n in listed for n in names) and target in listed
    assert _effective(s3_root) == expected  # hidden by the manifest

    compact_store(s3_root)
    listed = store_fs.FS.list(directory)
    assert not [n for n in names if n in listed] and "_merge-killed.json" not in listed
    assert len(_segments(s3_root, "layer_stats")) == 1
    assert _effective(s3_root) == expected  # no row twice after the target itself was merged away
