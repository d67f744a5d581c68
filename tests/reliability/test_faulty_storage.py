"""Faulty storage: read-only and full disks, slow stores, files deleted underneath.

Promise (DESIGN §10): a full or read-only disk never stops training. The Monitor keeps training
at full speed, drops the rows it cannot write, counts them (``Monitor.dropped_rows``), warns once,
and, once the fault clears, writes again and reports the count as the scalar
``monitor/dropped_rows``. No temporary file is left behind and the store stays readable.

Each fault runs on a real small filesystem (a tmpfs made read-only or filled up, when this
machine lets the test mount one) and with the error injected at the write call (everywhere).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from reliability_helpers import SmallFs, tmp_files, toy_model, train, wait_for

import healthwatch as hw
from healthwatch.store import StoreWriter, segments
from healthwatch.store import fs as store_fs

RUN = "faulty"
HEALTHY, FAULT, RECOVERED = range(0, 10), range(10, 30), range(30, 40)


class _OsWithFaultyRename:
    """``os`` as seen by ``healthwatch.store.fs`` (LocalFS), with ``rename`` failing (publish step)."""

    def __init__(self, err: int) -> None:
        self._err = err

    def rename(self, src: Any, dst: Any) -> None:
        raise OSError(self._err, os.strerror(self._err), str(dst))

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _faulty_write_table(err: int) -> Callable[..., None]:
    """A ``pq.write_table`` that writes a few bytes of the file, then fails like a full disk."""

    def write_table(table: Any, where: Any, *args: Any, **kwargs: Any) -> None:
        with open(where, "wb") as fh:
            fh.write(b"PAR1\0\0")
        raise OSError(err, os.strerror(err), str(where))

    return write_table


class Fault:
    """Switches one storage fault on and off: on a mounted tmpfs or injected at the write call."""

    def __init__(self, kind: str, how: str, monkeypatch: pytest.MonkeyPatch, fs: SmallFs | None) -> None:
        self.kind, self.how, self.mp, self.fs = kind, how, monkeypatch, fs

    def on(self) -> None:
        """Start the fault."""
        err = errno.EROFS if self.kind == "read-only" else errno.ENOSPC
        if self.how == "mount":
            assert self.fs is not None
            if self.kind == "read-only":
                self.fs.remount_ro()
            else:
                self.fs.fill()
        elif self.how == "write_table":
            self.mp.setattr(segments.pq, "write_table", _faulty_write_table(err))
        else:  # rename: the file is written, publishing it fails
            self.mp.setattr(store_fs, "os", _OsWithFaultyRename(err))

    def off(self) -> None:
        """Clear the fault (space returns, the disk is writable again)."""
        if self.how == "mount":
            assert self.fs is not None
            if self.kind == "read-only":
                self.fs.remount_rw()
            else:
                self.fs.free()
        else:
            self.mp.undo()


@pytest.fixture(params=["mount", "write_table", "rename"])
def how(request: pytest.FixtureRequest) -> str:
    """Where the fault happens: a real tmpfs, or injected at ``write_table`` / ``os.rename``."""
    return str(request.param)


@pytest.fixture
def root(how: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, SmallFs | None]]:
    """The store directory: on a small tmpfs for the mount variant, else in tmp_path."""
    if how == "mount":
        fs: SmallFs = request.getfixturevalue("small_fs")
        yield fs.path / "store", fs
    else:
        yield tmp_path / "store", None


def _monitor_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "healthwatch.monitor" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("kind", ["read-only", "disk-full"])
def test_storage_fault_training_continues_drops_counted_and_recovers(
    kind: str, how: str, root: tuple[Path, SmallFs | None], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Healthy → fault → healthy: every step trains, lost rows are exactly the fault's, reported after."""
    store, fs = root
    fault = Fault(kind, how, monkeypatch, fs)
    model = toy_model()
    caplog.set_level(logging.WARNING, logger="healthwatch.monitor")
    mon = hw.Monitor(store=store, run=RUN, flush_every_steps=5, flush_every_s=3600, expert_load_every=0)
    mon.watch(model)
    ran = train(mon, model, HEALTHY)
    mon.flush(wait=True)
    assert mon.dropped_rows == 0

    fault.on()
    try:
        ran += train(mon, model, FAULT)  # never raises into the loop
        mon.flush(wait=True)
        dropped_in_fault = mon.dropped_rows
    finally:
        fault.off()
    ran += train(mon, model, RECOVERED)
    mon.close()
    assert ran == len(HEALTHY) + len(FAULT) + len(RECOVERED)

    st = hw.open_store(store)
    steps = [s for (s,) in st.sql("SELECT DISTINCT step FROM scalars WHERE name = 'loss/train' ORDER BY step").fetchall()]
    assert steps == list(HEALTHY) + list(RECOVERED), "rows after the fault cleared were not written"
    # A plain step's rows: step 1 carries neither a flush's heartbeat (steps 4, 9, …) nor the
    # signals sampled every 100 steps (step 0), like every faulty step but the flushes' last ones.
    per_step = sum(st.sql(f"SELECT count(*) FROM {t} WHERE step = 1").fetchone()[0]
                   for t in ("scalars", "layer_stats", "expert_load"))
    # Exactly the rows of the 20 faulty steps were dropped, counted and then reported once: each
    # step's rows plus the one `monitor/heartbeat` of each of the 4 flushes.
    flushes = len(FAULT) // 5
    assert dropped_in_fault == mon.dropped_rows == per_step * len(FAULT) + flushes, (dropped_in_fault, per_step)
    reported = st.sql("SELECT step, value FROM scalars WHERE name = 'monitor/dropped_rows'").fetchall()
    assert reported and reported[-1][0] in RECOVERED and reported[-1][1] == mon.dropped_rows
    assert len(_monitor_warnings(caplog)) == 1, _monitor_warnings(caplog)
    assert not tmp_files(store), tmp_files(store)
    assert not st.bad_files


class _HangingStore:
    """``pq.write_table`` that hangs until ``release`` (``entered`` once a write started; ``calls`` counts)."""

    def __init__(self) -> None:
        self.release, self.entered = threading.Event(), threading.Event()
        self.calls = {"in": 0, "out": 0}
        self._real = segments.pq.write_table

    def write_table(self, *args: Any, **kwargs: Any) -> None:
        """The patched writer: wait for ``release``, then write for real."""
        self.calls["in"] += 1
        self.entered.set()
        self.release.wait(120)  # a timeout only so that a broken test cannot hang forever
        self._real(*args, **kwargs)
        self.calls["out"] += 1


def _queued_monitor(store: Path, model: Any, queue_size: int) -> hw.Monitor:
    """A Monitor flushing every step into a bounded writer queue (no time-based flushes)."""
    mon = hw.Monitor(store=store, run=RUN, flush_every_steps=1, flush_every_s=3600, queue_size=queue_size,
                     expert_load_every=0)
    mon.watch(model)
    return mon


def test_slow_store_fills_the_queue_training_keeps_pace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A store that hangs: the bounded queue fills, flushes beyond it are dropped and counted, and
    training runs every step while the writer is stuck. Once the store recovers, the writer drains
    exactly the flushes it held, and later flushes are written (no drops).

    Pacing in logical terms: training finishes while the writer is still inside its first write;
    the queue holds ``queue_size`` flushes and every other flush of the hang is dropped.
    """
    hang = _HangingStore()
    release, entered, calls, hanging_write_table = hang.release, hang.entered, hang.calls, hang.write_table
    store = tmp_path / "store"
    model = toy_model()
    queue_size = 2
    mon = _queued_monitor(store, model, queue_size)
    for step in range(0, 3):  # healthy: one writer iteration per step (a busy machine's writer lags)
        train(mon, model, range(step, step + 1))
        mon.flush(wait=True)
    assert mon.dropped_rows == 0
    monkeypatch.setattr(segments.pq, "write_table", hanging_write_table)
    with caplog.at_level(logging.WARNING, logger="healthwatch.monitor"):
        train(mon, model, range(3, 4))  # this flush reaches the writer, which hangs in write_table
        assert entered.wait(120), "the writer never started writing step 3"
        hung = range(4, 40)
        assert train(mon, model, hung) == len(hung)
        # Every step ran while the writer was still stuck in its first write: training kept pace.
        assert calls == {"in": 1, "out": 0} and not release.is_set()
    queued = list(hung)[:queue_size]  # the first flushes of the hang fit in the queue
    dropped_steps = len(hung) - queue_size
    assert mon.dropped_rows > 0
    release.set()
    monkeypatch.undo()
    # The writer drains what it held (the stuck flush and the queued ones); a flush queued behind
    # them returns once they are written. (The drain first: the steps below check pacing on an
    # empty queue; a wait-flush offered to a full queue waits for room, the next test's subject.)
    wait_for(lambda: mon._queue.qsize() == 0, 120, "the writer to take the queued flushes")
    mon.flush(wait=True)
    assert calls["out"] == 1 and mon._queue.qsize() == 0
    dropped = mon.dropped_rows
    # The store is fast again: each later flush is written before the next one (one writer
    # iteration per training step), so the queue never fills and nothing more is dropped.
    for step in range(40, 45):
        train(mon, model, range(step, step + 1))
        mon.flush(wait=True)
    mon.close()
    assert mon.dropped_rows == dropped, "rows dropped after the store recovered"
    st = hw.open_store(store)
    steps = [s for (s,) in st.sql("SELECT DISTINCT step FROM scalars WHERE name = 'loss/train' ORDER BY step")
             .fetchall()]
    assert steps == [0, 1, 2, 3, *queued, *range(40, 45)], steps
    per_step = sum(st.sql(f"SELECT count(*) FROM {t} WHERE step = 0").fetchone()[0]
                   for t in ("scalars", "layer_stats", "expert_load"))
    # Each dropped flush is counted alike. A flush dropped at the queue is counted by the Monitor's
    # row estimate (its rows are never built): exact except for the sampled extra signals, counted
    # on every step (test_dropped_row_estimate_equals_the_rows_a_flush_writes checks it exactly
    # with every signal sampled), so it is compared with a step's written rows only loosely here.
    per_flush, rest = divmod(mon.dropped_rows, dropped_steps)
    assert rest == 0 and per_flush > 0, (mon.dropped_rows, per_step, dropped_steps)
    reported = st.sql("SELECT max(value) FROM scalars WHERE name = 'monitor/dropped_rows'").fetchone()[0]
    assert reported == mon.dropped_rows
    assert len(_monitor_warnings(caplog)) == 1


def test_a_waited_flush_waits_for_room_in_a_full_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flush(wait=True)`` (what a checkpoint's ``state_dict`` does) on a full queue waits for room
    instead of dropping the flush: the checkpointed steps are all in the store, nothing is dropped.

    Logical pacing: the writer hangs in its first write, ordinary flushes fill the queue, then a
    thread calls ``state_dict()``; the store is released only once that thread waits on the queue.
    """
    hang = _HangingStore()
    release, entered = hang.release, hang.entered
    store = tmp_path / "store"
    model = toy_model()
    queue_size = 2
    mon = _queued_monitor(store, model, queue_size)
    monkeypatch.setattr(segments.pq, "write_table", hang.write_table)
    train(mon, model, range(0, 1))  # the writer takes this flush and hangs in it
    assert entered.wait(120), "the writer never started writing step 0"
    train(mon, model, range(1, 1 + queue_size))  # these fill the queue
    assert mon._queue.full() and mon.dropped_rows == 0
    mon.flush_every_steps = 10**6  # the next step stays in the Monitor until the checkpoint flushes it
    train(mon, model, range(1 + queue_size, 2 + queue_size))
    states: list[dict[str, Any]] = []
    checkpoint = threading.Thread(target=lambda: states.append(mon.state_dict()))
    checkpoint.start()
    # The checkpoint's flush is waiting for room (CPython's Condition keeps its waiters in ``_waiters``).
    wait_for(lambda: len(mon._queue.not_full._waiters) == 1, 120, "the checkpoint's flush to wait on the full queue")
    assert checkpoint.is_alive() and not states
    release.set()
    monkeypatch.undo()
    checkpoint.join(120)
    assert not checkpoint.is_alive() and len(states) == 1
    assert mon.dropped_rows == 0 and states[0]["dropped_rows"] == 0
    mon.close()
    st = hw.open_store(store)
    steps = [s for (s,) in st.sql("SELECT step FROM scalars WHERE name = 'loss/train' ORDER BY step").fetchall()]
    assert steps == list(range(2 + queue_size)), steps


def test_dropped_row_estimate_equals_the_rows_a_flush_writes(tmp_path: Path) -> None:
    """What a lost flush is counted as (``estimate_rows``, computed without decoding) equals the
    ``scalars`` + ``layer_stats`` rows the same flush writes when it is not lost."""
    from healthwatch.hooks.writer import estimate_rows

    model = toy_model()
    from healthwatch.hooks.config import MonitorConfig

    mon = hw.Monitor(store=tmp_path / "store", run=RUN, flush_every_steps=1, flush_every_s=3600,
                     expert_load_every=0, monitor_config=MonitorConfig(signals_every=1))
    mon.watch(model)
    estimates: dict[int, int] = {}
    real_put = mon.writer.put

    def put(item: Any, rows: int, block_s: float = 0.0) -> None:
        for meta in item.steps:  # one step per flush here
            estimates[meta.step] = estimate_rows(item.steps, item.extras, item.decoder)
        real_put(item, rows, block_s)

    mon.writer.put = put  # type: ignore[method-assign]
    train(mon, model, range(0, 6), extra=lambda s: {"extra/a": float(s), "extra/b": 2.0 * s})
    mon.close()
    st = hw.open_store(tmp_path / "store")
    written = {step: n for step, n in st.sql(
        "SELECT step, count(*) FROM (SELECT step FROM scalars WHERE run = ? UNION ALL "
        "SELECT step FROM layer_stats WHERE run = ?) GROUP BY step", [RUN, RUN]).fetchall()}
    assert estimates and set(estimates) <= set(written)
    assert {s: written[s] for s in estimates} == estimates


def _delete_randomly(root: Path, stop: threading.Event, seed: int, counts: dict[str, int],
                     every_s: float = 0.03, turns: threading.Semaphore | None = None) -> None:
    """Delete segment files and whole run directories under a live store until ``stop``: one every
    ``every_s`` seconds, or one per turn handed out through ``turns`` (logical pacing)."""
    rng = random.Random(seed)
    while not stop.is_set():
        if turns is not None and not turns.acquire(timeout=0.05):
            continue
        files = [p for p in root.rglob("*.parquet")]
        if files:
            victim = rng.choice(files)
            if rng.random() < 0.15:
                shutil.rmtree(victim.parent, ignore_errors=True)
                counts["dirs"] += 1
            else:
                try:
                    victim.unlink()
                    counts["files"] += 1
                except FileNotFoundError:
                    pass
        if turns is None:
            stop.wait(every_s)


def test_files_deleted_underneath_a_writing_monitor(tmp_path: Path) -> None:
    """Segments and whole directories vanish while the Monitor writes: training goes on, writing resumes."""
    store = tmp_path / "store"
    model = toy_model()
    mon = hw.Monitor(store=store, run=RUN, flush_every_steps=2, expert_load_every=0)
    mon.watch(model)
    train(mon, model, range(0, 10))
    mon.flush(wait=True)
    stop = threading.Event()
    counts = {"files": 0, "dirs": 0}
    deleter = threading.Thread(target=_delete_randomly, args=(store, stop, 1, counts))
    deleter.start()
    step = 10

    def churn() -> bool:
        nonlocal step
        step += train(mon, model, range(step, step + 2))
        return counts["files"] >= 10 and counts["dirs"] >= 2

    try:
        wait_for(churn, 600, "the deleter to delete files and directories during training", every=0.0)
        mon.flush(wait=True)
    finally:
        stop.set()
        deleter.join(10)
    after = step
    train(mon, model, range(after, after + 10))
    mon.close()
    st = hw.open_store(store)
    last = st.sql("SELECT count(DISTINCT step) FROM scalars WHERE name = 'loss/train' AND step >= ?",
                  [after]).fetchone()
    assert last == (10,), "writing did not resume after the deletions stopped"
    assert not st.bad_files
    assert counts["files"] + counts["dirs"] >= 10


def test_reader_survives_files_deleted_underneath(tmp_path: Path) -> None:
    """A reader keeps answering while segments are written, deleted and whole runs removed.

    Paced in turns, not seconds: each read hands every writer one segment to write and the deleter
    one deletion, which happen while that read lists, checks and binds the files. However slow the
    machine, each read races a bounded number of changes (how fast they come is a benchmark's
    question, not this test's)."""
    store = tmp_path / "store"
    batch = 50
    writers = 2

    def write_batches(run: str, stop: threading.Event, turns: threading.Semaphore) -> None:
        w = StoreWriter(store, run)
        i = 0
        while not stop.is_set():
            if not turns.acquire(timeout=0.05):
                continue
            steps = np.arange(i * batch, (i + 1) * batch)
            try:
                w.write("scalars", {"attempt": [1] * batch, "step": steps, "tokens": steps, "name": ["x"] * batch,
                                    "value": steps.astype(float), "wall_time": np.zeros(batch)})
            except FileNotFoundError:
                continue  # the deleter removed this run's directory mid-write: part of the chaos
            i += 1

    StoreWriter(store, "seed").write("scalars", {"attempt": [1], "step": [0], "tokens": [0], "name": ["x"],
                                                 "value": [0.0], "wall_time": [0.0]})
    st = hw.open_store(store)
    stop = threading.Event()
    counts = {"files": 0, "dirs": 0}
    # At most one pending turn each (bounded at 1, taken at once), so changes never pile up.
    writer_turns = [threading.BoundedSemaphore(1) for _ in range(writers)]
    delete_turns = threading.BoundedSemaphore(1)
    for turns in (*writer_turns, delete_turns):
        turns.acquire()
    threads = [threading.Thread(target=write_batches, args=(f"r{i}", stop, writer_turns[i])) for i in range(writers)]
    threads.append(threading.Thread(target=_delete_randomly, args=(store, stop, 2, counts, 0.0, delete_turns)))
    for t in threads:
        t.start()
    reads = 0
    try:
        def enough_reads() -> bool:
            nonlocal reads
            for turns in (*writer_turns, delete_turns):
                with contextlib.suppress(ValueError):  # a turn still pending is not doubled
                    turns.release()  # one change each, racing the read below
            for (run, n, s) in st.sql("SELECT run, count(*), sum(step % 50) FROM scalars "
                                      "WHERE run <> 'seed' GROUP BY run").fetchall():
                assert n % batch == 0 and s == (n // batch) * sum(range(batch)), (run, n, s)  # whole segments only
            reads += 1
            return reads >= 40 and counts["files"] >= 10 and counts["dirs"] >= 1

        wait_for(enough_reads, 600, "40 reads while files and directories are deleted", every=0.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not st.bad_files
    # After the chaos, the store reads exactly what is on disk.
    on_disk = sum(pq.read_metadata(p).num_rows for p in st.files("scalars"))
    assert st.sql("SELECT count(*) FROM scalars").fetchone() == (on_disk,)
