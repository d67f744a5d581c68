"""The Monitor's writer thread: everything on the far side of its queue.

The training thread (:mod:`healthwatch.hooks.monitor`) hands over one :class:`FlushItem` per flush:
the flat statistics buffer (maybe still being copied from the device), the host-side facts about
each step, and the events. :class:`MonitorWriter` runs in its own thread and, per item, waits for
the copy, decodes rows (:func:`healthwatch.hooks.rows.build_rows`), publishes segments through a
:class:`healthwatch.store.StoreWriter`, merges its own small segments, then calls the after-flush
objects (e.g. the alert evaluator, wired in by whoever built the Monitor). Nothing here raises
into training: failures are counted as dropped rows and warned about once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import torch

from healthwatch.hooks.collector import Layout
from healthwatch.hooks.rows import DeadExpertWindow, ExtraMeta, RowBuilder, StepMeta, build_rows
from healthwatch.store import StoreWriter, attempt_row, init_store, run_row

log = logging.getLogger("healthwatch.monitor")


@runtime_checkable
class AfterFlush(Protocol):
    """Called by the writer thread after each flush of a run is in the store.

    ``after_flush`` returns what happened (e.g. the alert evaluator's state transitions) or None;
    the Monitor's ``on_alert`` callback is called with each returned item.
    """

    def after_flush(self, store_root: Path, run: str) -> Sequence[Any] | None:
        """React to newly written rows of ``run`` in the store at ``store_root``."""
        ...


class _CallableAfterFlush:
    """Adapts a plain ``f(store_root, run)`` function to :class:`AfterFlush`."""

    def __init__(self, fn: Callable[[Path, str], Any]) -> None:
        self.fn = fn

    def after_flush(self, store_root: Path, run: str) -> Sequence[Any] | None:
        """Call the wrapped function."""
        return self.fn(store_root, run)


def as_after_flush(obj: AfterFlush | Callable[[Path, str], Any]) -> AfterFlush:
    """``obj`` itself when it has ``after_flush``, a wrapper when it is a plain callable."""
    if hasattr(obj, "after_flush"):
        return obj  # type: ignore[return-value]
    if callable(obj):
        return _CallableAfterFlush(obj)
    raise ValueError(f"after_flush entries must have .after_flush(store_root, run) or be callable, got {obj!r}")


@dataclass
class Decoder:
    """How to turn a flushed buffer into rows: the watched model's layout, fixed at ``watch()``."""

    layout: Layout
    block_types: list[str]
    residual: list[bool]
    layer_ids: list[int] | None
    dead: DeadExpertWindow | None = None
    """Trailing dead-expert window over the globally reduced counts (what rank 0 writes)."""
    local_dead: DeadExpertWindow | None = None
    """The same over this rank's own counts (``per_rank`` only)."""

    @classmethod
    def empty(cls) -> Decoder:
        """The decoder before ``watch()``: scalars only, no layers."""
        return cls(Layout(0, [], [], [], 0), [], [], None)


@dataclass
class FlushItem:
    """One hand-over from the training thread to the writer thread."""

    flat: torch.Tensor
    """Statistics of all steps of the flush (globally reduced), on the host once ``event`` completes."""
    event: Any
    """CUDA event marking the end of the non-blocking device-to-host copies, or None."""
    steps: list[StepMeta]
    extras: list[ExtraMeta]
    extras_offset: int
    events: list[dict[str, Any]]
    decoder: Decoder = field(default_factory=Decoder.empty)
    first_step: int | None = None
    """First step the Monitor saw: the attempt's start step unless one was given."""
    local: torch.Tensor | None = None
    """This rank's own statistics before the reduction (``per_rank``), same layout as ``flat``."""
    done: threading.Event | None = None


@dataclass
class RunDeclaration:
    """What the writer declares in the ``runs`` and ``attempts`` tables before a run's first rows."""

    precision: str
    parent: str | None = None
    branch_step: int | None = None
    branch_tokens: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The run's config; the same dict the Monitor updates in ``watch()`` (serialised at first write)."""
    start_step: int | None = None
    reason: str = "start"


class DropCounter:
    """Rows lost on either side of the queue, counted under a lock and warned about once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        """Rows dropped so far by this Monitor (also after ``load_state_dict``)."""
        self.reported = 0
        """The total last written to the store as ``monitor/dropped_rows``."""
        self._warned = False

    def drop(self, rows: int, why: str) -> None:
        """Count ``rows`` lost because of ``why``."""
        with self._lock:
            self.total += rows
        self.warn(f"dropping rows: {why}")

    def warn(self, message: str) -> None:
        """Log ``message`` if nothing was logged before (a broken store must not flood the log)."""
        with self._lock:
            if self._warned:
                return
            self._warned = True
        log.warning("healthwatch: %s (further problems are counted in monitor/dropped_rows)", message)


def estimate_rows(steps: list[StepMeta], extras: list[ExtraMeta], decoder: Decoder) -> int:
    """Rows of ``scalars`` and ``layer_stats`` a flush would write (counted as dropped when it is lost).

    Exact for scalars, residual, gradient-norm and router rows (from each step's own call counts,
    known on the host without decoding); the extra signals count one row per slot, as if every slot
    saw data that step (an upper bound for sampled families). Computed in the training thread when
    the queue is full, so it never decodes the buffer.
    """
    lay = decoder.layout
    specials = sum(1 for g in lay.special if g not in lay.unrecorded)
    routers = len(lay.router_layers) * (2 if decoder.dead is not None else 1)  # maxvio (+ dead_experts)
    bank = lay.bank
    bank_rows = len(bank.ratio_slots) + len(bank.max_slots) if bank is not None else 0
    residual = decoder.residual or [True] * lay.num_blocks
    total = 0
    for s in steps:
        total += len(s.scalar_names) + len(s.host_scalars) + bank_rows
        total += 2 * sum(1 for i, c in enumerate(s.resid_calls) if c > 0 and i < len(residual) and residual[i])
        if s.has_wgrad:
            total += lay.num_blocks + specials
        if any(s.router_calls):
            total += routers
    return total + sum(len(e.device_names) + len(e.host_scalars) for e in extras)


class MonitorWriter:
    """The writer thread of one Monitor: a bounded queue of :class:`FlushItem` and the thread draining it.

    ``writes`` (rank 0) writes the global statistics, events and run metadata as ``run``;
    ``per_rank`` writes this rank's unreduced statistics as ``<run>.rank<rank>``.
    """

    def __init__(
        self,
        root: Path,
        run: str,
        attempt: int,
        rank: int,
        world: int,
        writes: bool,
        declaration: RunDeclaration,
        drops: DropCounter,
        expert_load_every: int,
        queue_size: int,
        per_rank: bool = False,
        after_flush: Sequence[AfterFlush] = (),
        on_alert: Callable[[Any], None] | None = None,
    ) -> None:
        self.root, self.run, self.attempt = root, run, attempt
        self.rank, self.world, self.writes = rank, world, writes
        self.declaration = declaration
        self.drops = drops
        self.expert_load_every = expert_load_every
        self.per_rank = per_rank
        self.rank_run = f"{run}.rank{rank}"
        self.after_flush = list(after_flush)
        self.on_alert = on_alert
        self.queue: queue.Queue[FlushItem | None] = queue.Queue(maxsize=queue_size)
        self._store: StoreWriter | None = None
        self._rank_store: StoreWriter | None = None
        self._declared: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name=f"healthwatch-writer-{run}", daemon=True)
        self._thread.start()

    # -- training-thread side --------------------------------------------------------------
    def put(self, item: FlushItem, rows: int, block_s: float = 0.0) -> None:
        """Queue ``item``; when the queue is full its ``rows`` are dropped and counted.

        ``block_s`` > 0 waits up to that long for room first: a flush the caller waits on (a
        checkpoint's ``state_dict``) must not be dropped just because the writer is a few flushes behind.
        """
        try:
            if block_s > 0:
                self.queue.put(item, timeout=block_s)
            else:
                self.queue.put_nowait(item)
        except queue.Full:
            self.drops.drop(rows, "writer queue full (store too slow)")
            if item.done is not None:
                item.done.set()

    def pending(self) -> int:
        """Flushes waiting in the queue (not counting the one being written)."""
        return self.queue.qsize()

    def is_alive(self) -> bool:
        """True while the writer thread runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        """Let the thread finish what is queued, then end it (waits up to ``timeout`` seconds)."""
        try:
            self.queue.put(None, timeout=min(30.0, timeout))
        except queue.Full:
            pass
        self._thread.join(timeout=timeout)

    # -- writer thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                self._close_stores()
                return
            try:
                self.write(item)
            except Exception as exc:  # noqa: BLE001 - the writer must never die
                lost = estimate_rows(item.steps, item.extras, item.decoder) + len(item.events)
                self.drops.drop(lost, f"write failed: {exc}")
            finally:
                if item.done is not None:
                    item.done.set()

    def _close_stores(self) -> None:
        """Publish the open rollup buckets of this attempt's store writers (the attempt ends)."""
        for store in (self._store, self._rank_store):
            if store is None:
                continue
            try:
                store.close()
            except Exception as exc:  # noqa: BLE001 - rollups are derived data; raw rows are safe
                log.warning("healthwatch: closing the store writer of %s failed: %s", store.run, exc)

    def _store_for(self, run: str) -> StoreWriter:
        if run == self.run:
            if self._store is None:
                init_store(self.root)
                self._store = StoreWriter(self.root, run, attempt=self.attempt, rank=self.rank)
            return self._store
        if self._rank_store is None:
            init_store(self.root)
            self._rank_store = StoreWriter(self.root, run, attempt=self.attempt, rank=self.rank)
        return self._rank_store

    def _declare(self, writer: StoreWriter, item: FlushItem) -> None:
        """Write the ``runs`` and ``attempts`` rows of ``writer.run`` once (retried after a failure)."""
        if writer.run in self._declared:
            return
        d = self.declaration
        now = time.time()
        config: dict[str, Any] = d.config
        parent, branch_step, branch_tokens = d.parent, d.branch_step, d.branch_tokens
        if writer.run != self.run:
            # A rank's own run is not a branch: it points at its global run through its config.
            config = {**d.config, "per_rank": {"run": self.run, "rank": self.rank, "world": self.world}}
            parent = branch_step = branch_tokens = None
        # Every attempt declares the run; the `runs` view keeps the first declaration.
        writer.write("runs", run_row(parent=parent, branch_step=branch_step, branch_tokens=branch_tokens,
                                     precision=d.precision, config=config or {}, created=now))
        start = d.start_step if d.start_step is not None else item.first_step
        if start is None:
            start = min((e["step"] for e in item.events), default=0)
        writer.write("attempts", attempt_row(attempt=self.attempt, start_step=start, started_at=now, reason=d.reason))
        self._declared.add(writer.run)

    def write(self, item: FlushItem) -> None:
        """Write one flush (runs in the writer thread; exceptions are counted by the caller)."""
        if item.event is not None:
            item.event.synchronize()
        if not item.steps and not item.extras and not item.events:
            return
        if self.writes:
            self._write_global(item)
        if item.local is not None and item.steps:
            self._write_local(item)
        if self.writes and (item.steps or item.extras):
            self._run_after_flush()

    def _decode(self, flat: torch.Tensor, item: FlushItem, dead: DeadExpertWindow | None, world: int) -> RowBuilder:
        dec = item.decoder
        return build_rows(
            flat.numpy() if flat.numel() else np.zeros(0), item.steps, item.extras, item.extras_offset,
            dec.layout, dec.block_types, dec.residual, dead, self.attempt, world, self.expert_load_every,
            dec.layer_ids,
        )

    def _write_global(self, item: FlushItem) -> None:
        writer = self._store_for(self.run)
        self._declare(writer, item)
        if item.events:
            ev = item.events
            writer.write("events", {k: [e[k] for e in ev] for k in ev[0]})
        if not item.steps and not item.extras:
            return
        rows = self._decode(item.flat, item, item.decoder.dead, self.world)
        count = self.drops.total
        report = count != self.drops.reported and bool(item.steps)
        if report:
            last = item.steps[-1]
            rows.scalar(last.step, last.tokens, last.wall_time, "monitor/dropped_rows", float(count))
        written = self._write_tables(writer, rows, own_rows=int(report))
        if report and "scalars" in written:
            self.drops.reported = count  # reported only once it is really in the store

    def _write_local(self, item: FlushItem) -> None:
        assert item.local is not None
        writer = self._store_for(self.rank_run)
        self._declare(writer, item)
        # Unreduced: this rank's sums are its own, so nothing is divided by the world size.
        rows = self._decode(item.local, item, item.decoder.local_dead, 1)
        self._write_tables(writer, rows)

    def _write_tables(self, writer: StoreWriter, rows: RowBuilder, own_rows: int = 0) -> list[str]:
        """Write one flush's tables; returns those written.

        On a storage error the rows of the tables not written are counted as dropped (the
        ``own_rows`` report of earlier drops among them excluded: it is re-sent with the new total).
        """
        written = []
        tables = (("scalars", rows.scalars), ("layer_stats", rows.layers), ("expert_load", rows.load))
        def count(cols: Any) -> int:
            return cols.num_rows if isinstance(cols, pa.Table) else len(cols["step"])

        try:
            for table, cols in tables:
                if count(cols):
                    writer.write(table, cols)
                    written.append(table)
        except OSError as exc:
            lost = sum(count(cols) for table, cols in tables if table not in written)
            self.drops.drop(lost - (own_rows if "scalars" not in written else 0), f"cannot write to {self.root}: {exc}")
            return written
        for table in written:
            try:
                writer.compact_own(table)
            except Exception as exc:  # noqa: BLE001 - merging is an optimisation, never fatal
                log.debug("self-compaction of %s failed: %s", table, exc)
        return written

    def _run_after_flush(self) -> None:
        for obj in self.after_flush:
            try:
                results = obj.after_flush(self.root, self.run) or []
            except Exception as exc:  # noqa: BLE001 - an after-flush bug must not break writing
                log.warning("healthwatch: after-flush %s failed: %s", type(obj).__name__, exc)
                continue
            if self.on_alert is None:
                continue
            for r in results:
                try:
                    self.on_alert(r)
                except Exception as exc:  # noqa: BLE001 - a callback bug must not kill the writer
                    log.warning("healthwatch: on_alert callback raised: %s", exc)
