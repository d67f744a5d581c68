"""The :class:`Monitor`: the callback a trainer calls to stream health signals into a store.

Hot path (``step``, ``log``, hooks, ``after_backward``): device ops and Python bookkeeping only.
Flush (every ``flush_every_s`` seconds or ``flush_every_steps`` steps, and at ``close``): one
concatenation into a flat buffer, the distributed reductions, one non-blocking copy to pinned
memory, and a hand-off to a background thread through a bounded queue. The background thread
waits for the copy, decodes rows, writes segments, merges its own small segments and runs the
alert evaluator. Store failures are logged once and counted as dropped rows; they never reach
the training loop.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from healthwatch.hooks.adapters import Adapter, ModelSpec, auto_adapter
from healthwatch.hooks.collector import StatsCollector
from healthwatch.hooks.rows import DeadExpertWindow, ExtraMeta, StepMeta, build_rows
from healthwatch.schema import check_schema_version, validate_metric_name, validate_run_name
from healthwatch.store import (
    END_EVENT,
    META_FILE,
    StoreWriter,
    attempt_row,
    default_store_path,
    init_store,
    run_row,
)

log = logging.getLogger("healthwatch.monitor")

Number = float | int | torch.Tensor


@dataclass
class _Flush:
    flat: torch.Tensor
    event: Any
    steps: list[StepMeta]
    extras: list[ExtraMeta]
    extras_offset: int
    events: list[dict[str, Any]]
    done: threading.Event | None = None


def _is_tensor(v: object) -> bool:
    return isinstance(v, torch.Tensor)


def _refuse_newer_schema(root: Path) -> None:
    """Raise ``NewerSchemaError`` at construction when ``root`` was written by a newer healthwatch.

    Refusing here, before training starts, is the one clear error; found later in the writer
    thread it would only drop every row. An absent or unreadable metadata file is left to the
    writer (which reports it as dropped rows) so that a damaged store never stops a run.
    """
    try:
        meta = json.loads((root / META_FILE).read_text())
        found = meta.get("schema_version") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return
    check_schema_version(found, f"store {root}")


class Monitor:
    """Streams per-step, per-layer training-health signals of one run into a healthwatch store.

    Args:
        store: store directory (default ``$HEALTHWATCH_STORE`` or ``./healthwatch-store``).
        run: run name (letters, digits, ``._+-``; becomes a directory name).
        precision: e.g. ``"nvfp4"`` or ``"bf16"``; recorded on the run.
        parent, branch_step, branch_tokens: set for a branch run (e.g. a BF16 ablation).
        config: run configuration, stored as JSON.
        log_every: record every N-th step (hooks are idle on other steps).
        expert_load_every: store the full expert-load vector every N steps.
        flush_every_s, flush_every_steps: flush cadence (whichever first). In a multi-rank job
            only the step cadence is used, because every rank must reduce at the same step.
        dead_window: trailing window (steps) for dead experts.
        queue_size: bound on flushes waiting for the writer; beyond it rows are dropped and counted.
        process_group: group for the reductions (default: the world when distributed is initialised).
        per_rank: also write each rank's own stats (as run ``<run>.rank<k>``).
        attempt: force an attempt number (default: one more than the store holds for this run).
        reason: why this attempt started (``start``, ``resume``, ``rollback``, …).
        start_step: first step of this attempt (default: the first step logged); rows of earlier
            attempts at steps ≥ it are superseded.
        alerts: rules to evaluate after each flush (path(s), ``"default"``, or an evaluator object
            with ``after_flush(store_root, run)``); ``on_alert`` is called with each transition,
            in the writer thread.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        run: str = "run",
        precision: str = "bf16",
        parent: str | None = None,
        branch_step: int | None = None,
        branch_tokens: int | None = None,
        config: Mapping[str, Any] | None = None,
        log_every: int = 1,
        expert_load_every: int = 100,
        flush_every_s: float = 5.0,
        flush_every_steps: int = 100,
        dead_window: int = 100,
        queue_size: int = 64,
        process_group: Any = None,
        per_rank: bool = False,
        attempt: int | None = None,
        reason: str | None = None,
        start_step: int | None = None,
        alerts: Any = None,
        on_alert: Callable[[Any], None] | None = None,
    ) -> None:
        self.run = validate_run_name(run)
        if parent is not None:
            validate_run_name(parent)
        if (parent is None) != (branch_step is None) and branch_tokens is None:
            raise ValueError("a branch run needs both parent= and branch_step= (or neither)")
        self.root = Path(default_store_path(store))
        _refuse_newer_schema(self.root)
        self.precision = precision
        self.parent, self.branch_step, self.branch_tokens = parent, branch_step, branch_tokens
        self.config = dict(config or {})
        self.log_every = max(1, int(log_every))
        self.expert_load_every = int(expert_load_every)
        self.flush_every_s = float(flush_every_s)
        self.flush_every_steps = max(1, int(flush_every_steps))
        self.dead_window = max(1, int(dead_window))
        self.on_alert = on_alert
        self._alerts_spec = alerts
        self._alerts: Any = None
        if alerts is not None and not hasattr(alerts, "after_flush"):
            # Load and validate the rules now: a bad rule file is an error at Monitor(...) time,
            # not a warning lost in the writer thread.
            from healthwatch.alerts import monitor_evaluator

            self._alerts = monitor_evaluator(alerts, self.root, self.run)

        self._group = process_group
        self._dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank(process_group) if self._dist else 0
        self.world = torch.distributed.get_world_size(process_group) if self._dist else 1
        self.per_rank = per_rank
        self.writes = self.rank == 0

        self.dropped_rows = 0
        self._reported_dropped = 0
        self._warned = False
        self._closed = False
        self.attempt = attempt if attempt is not None else self._next_attempt()
        self.reason = reason or ("start" if self.attempt == 1 else "resume")
        self._meta_written = False
        self.start_step = start_step

        self.spec: ModelSpec | None = None
        self._collector: StatsCollector | None = None
        self.device = torch.device("cpu")
        self._steps: list[StepMeta] = []
        self._sum_rows: list[torch.Tensor] = []
        self._max_rows: list[torch.Tensor] = []
        self._sum_len = 0
        self._extras: list[ExtraMeta] = []
        self._extra_tensors: list[torch.Tensor] = []
        self._valid_names: set[str] = set()
        self._extra_len = 0
        self._events: list[dict[str, Any]] = []
        self._last_step = -1
        self._last_tokens = 0
        self._first_step: int | None = None
        self._last_flush = time.monotonic()
        self._dead: DeadExpertWindow | None = None
        self._pending_dead_state: dict[str, Any] | None = None

        self._queue: queue.Queue[_Flush | None] = queue.Queue(maxsize=max(1, queue_size))
        self._writer: StoreWriter | None = None
        self._rank_writer: StoreWriter | None = None
        self._thread = threading.Thread(target=self._writer_loop, name=f"healthwatch-writer-{self.run}", daemon=True)
        self._thread.start()

    # -- setup -------------------------------------------------------------------------------
    def _next_attempt(self) -> int:
        found = 0
        if self.rank == 0:
            try:
                from healthwatch.store import Store

                if self.root.is_dir():
                    st = Store(self.root)
                    try:
                        row = st.sql("SELECT max(attempt) FROM attempts WHERE run = ?", [self.run]).fetchone()
                        found = int(row[0]) if row and row[0] is not None else 0
                        if self.parent is not None and self.branch_tokens is None and self.branch_step is not None:
                            tok = st.sql(
                                "SELECT max(tokens) FROM scalars_effective WHERE run = ? AND step <= ?",
                                [self.parent, int(self.branch_step)],
                            ).fetchone()
                            if tok and tok[0] is not None:
                                self.branch_tokens = int(tok[0])
                    finally:
                        st.close()
            except Exception as exc:  # noqa: BLE001 - an unreadable store must not stop training
                self._warn(f"could not read store {self.root} to number the attempt: {exc}")
        if self._dist and self.world > 1:
            box = [found]
            torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(self._group, 0)
                                                    if self._group is not None else 0, group=self._group)
            found = int(box[0])
        return found + 1

    def watch(self, model: nn.Module, adapter: Adapter | None = None) -> ModelSpec:
        """Attach hooks to ``model`` (adapter picked automatically unless given); returns what was found."""
        if self._collector is not None:
            self._collector.detach()
        adapter = adapter or auto_adapter(model)
        spec = adapter.inspect(model)
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")
        self.spec = spec
        self._collector = StatsCollector(spec, self.device)
        self._collector.attach()
        if spec.routers:
            self._dead = DeadExpertWindow(self.dead_window, [r.num_experts for r in spec.routers])
            if self._pending_dead_state:
                self._dead.load_state_dict(self._pending_dead_state)
        self.config.setdefault("healthwatch", {}).update(
            {"adapter": spec.adapter, "layers": [b.layer_type for b in spec.blocks],
             "experts": [r.num_experts for r in spec.routers]}
        )
        return spec

    # -- hot path ----------------------------------------------------------------------------
    def _recording(self, step: int) -> bool:
        return step % self.log_every == 0

    def after_backward(self) -> None:
        """Record per-block and special gradient norms; call after backward, before ``optimizer.step()``."""
        if self._collector is not None and self._collector.active:
            self._collector.after_backward()

    def step(
        self,
        step: int,
        tokens: int | None = None,
        loss: Number | None = None,
        mtp_losses: Sequence[Number] | None = None,
        lr: Number | None = None,
        **scalars: Number,
    ) -> None:
        """Close one training step: record losses, lr and the hooks' statistics (no host sync)."""
        if self._closed:
            return
        step = int(step)
        tokens = int(tokens) if tokens is not None else step
        self._last_step, self._last_tokens = step, tokens
        if self._first_step is None:
            self._first_step = step
        collector = self._collector
        recording = self._recording(step)
        if recording:
            named: list[tuple[str, Number]] = []
            if loss is not None:
                named.append(("loss/train", loss))
            for i, v in enumerate(mtp_losses or ()):
                named.append((f"loss/mtp_{i + 1}", v))
            if lr is not None:
                named.append(("lr", lr))
            named.extend(scalars.items())
            dev_names, dev_vals, host = [], [], {}
            for name, v in named:
                if _is_tensor(v):
                    dev_names.append(name)
                    dev_vals.append(v.detach().reshape(-1)[:1].to(self.device, torch.float64))
                else:
                    host[name] = float(v)
            if collector is not None:
                sum_row, max_row, rcalls, rtcalls, has_wgrad = collector.take_row(dev_vals)
            else:
                sum_row = torch.cat(dev_vals) if dev_vals else torch.zeros(0, dtype=torch.float64)
                max_row = torch.zeros(0, dtype=torch.float64, device=sum_row.device)
                rcalls, rtcalls, has_wgrad = [], [], False
            meta = StepMeta(
                step=step, tokens=tokens, wall_time=time.time(), scalar_names=dev_names, host_scalars=host,
                resid_calls=rcalls, router_calls=rtcalls, has_wgrad=has_wgrad,
                sum_offset=self._sum_len, sum_len=sum_row.numel(), max_offset=0,
            )
            self._steps.append(meta)
            self._sum_rows.append(sum_row)
            self._max_rows.append(max_row)
            self._sum_len += sum_row.numel()
        elif collector is not None:
            collector.take_row([])  # discard what hooks gathered on an unrecorded step
        if collector is not None:
            # Hooks run for the *next* step only if it will be recorded.
            collector.active = self._recording(step + 1)
        if self._due():
            self.flush()

    def _due(self) -> bool:
        n = len(self._steps)
        if n >= self.flush_every_steps:
            return True
        if self._dist and self.world > 1:
            return False  # time-based flushes would make ranks reduce at different steps
        return n > 0 and time.monotonic() - self._last_flush >= self.flush_every_s

    def log(self, values: Mapping[str, Number], step: int | None = None, tokens: int | None = None) -> None:
        """Record extra scalars (floats or 0-d/1-element tensors) at ``step`` (default: the last step).

        Invalid names are dropped with one warning and counted, never raised into the loop.
        """
        if self._closed:
            return
        step = self._last_step if step is None else int(step)
        tokens = self._last_tokens if tokens is None else int(tokens)
        dev_names: list[str] = []
        dev_vals: list[torch.Tensor] = []
        host: dict[str, float] = {}
        valid = self._valid_names
        for name, v in values.items():
            if name not in valid:  # the regex costs ~1 µs: check each name once, not every step
                try:
                    validate_metric_name(name)
                except ValueError as exc:
                    self._drop(1, str(exc))
                    continue
                if len(valid) < 100_000:
                    valid.add(name)
            if _is_tensor(v):
                dev_names.append(name)
                dev_vals.append(v)
            else:
                host[name] = float(v)
        if dev_vals:
            # One device op for the whole dict (per-tensor ops cost ~0.5 µs each on the host).
            self._extra_tensors.append(self._stack_values(dev_vals))
        self._extras.append(ExtraMeta(step, tokens, time.time(), dev_names, host, self._extra_len))
        self._extra_len += len(dev_names)

    def _stack_values(self, values: list[torch.Tensor]) -> torch.Tensor:
        """First element of each tensor as one new float64 tensor on the Monitor's device (no sync)."""
        with torch.no_grad():
            try:
                flat = torch.stack(values) if values[0].dim() == 0 else None
            except RuntimeError:  # mixed shapes or devices: fall back to one op per tensor
                flat = None
            if flat is None or flat.dim() != 1:
                return torch.cat([v.detach().reshape(-1)[:1].to(self.device, torch.float64) for v in values])
            return flat.to(self.device, torch.float64)

    def event(self, kind: str, step: int | None = None, message: str = "", tokens: int | None = None) -> None:
        """Record an event (``checkpoint``, ``rollback``, ``note``, …); written at once by the writer thread."""
        if self._closed or not self.writes:
            return
        rec = {
            "attempt": self.attempt,
            "step": self._last_step if step is None else int(step),
            "tokens": self._last_tokens if tokens is None else int(tokens),
            "kind": str(kind)[:100],
            "message": str(message)[:10_000],
            "wall_time": time.time(),
        }
        self._put(_Flush(torch.zeros(0), None, [], [], 0, [rec]), rows=1)

    # -- flush -------------------------------------------------------------------------------
    def flush(self, wait: bool = False) -> None:
        """Hand everything recorded so far to the writer thread (``wait`` blocks until written)."""
        self._last_flush = time.monotonic()
        steps, extras = self._steps, self._extras
        if not steps and not extras and not wait:
            return
        parts = self._sum_rows + self._max_rows + self._extra_tensors
        n_sum = self._sum_len
        max_offset = n_sum
        for meta, row in zip(steps, self._max_rows):
            meta.max_offset = max_offset
            max_offset += row.numel()
        extras_offset = max_offset
        self._steps, self._sum_rows, self._max_rows, self._sum_len = [], [], [], 0
        self._extras, self._extra_tensors, self._extra_len = [], [], 0
        if parts:
            flat = torch.cat([p.to(self.device) for p in parts]) if len(parts) > 1 else parts[0].clone()
        else:
            flat = torch.zeros(0, dtype=torch.float64)
        if self._dist and self.world > 1 and steps:
            torch.distributed.all_reduce(flat[:n_sum], op=torch.distributed.ReduceOp.SUM, group=self._group)
            torch.distributed.all_reduce(flat[n_sum:extras_offset], op=torch.distributed.ReduceOp.MAX, group=self._group)
        event = None
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flat = host
        nrows = self._estimate_rows(steps, extras)
        done = threading.Event() if wait else None
        if self.writes or (self.per_rank and steps):
            self._put(_Flush(flat, event, steps, extras, extras_offset, [], done), rows=nrows)
        elif done is not None:
            done.set()  # nothing queued on a non-writing rank: waiting would only hit the timeout
        if done is not None and self._thread.is_alive():
            done.wait(timeout=120)

    def _estimate_rows(self, steps: list[StepMeta], extras: list[ExtraMeta]) -> int:
        if self.spec is None:
            per = 0
        else:
            per = 3 * self.spec.num_layers + 2 * len(self.spec.routers) + 4
        return sum(len(s.scalar_names) + len(s.host_scalars) + per for s in steps) + sum(
            len(e.device_names) + len(e.host_scalars) for e in extras
        )

    def _put(self, item: _Flush, rows: int) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop(rows, "writer queue full (store too slow)")
            if item.done is not None:
                item.done.set()

    def _drop(self, rows: int, why: str) -> None:
        self.dropped_rows += rows
        self._warn(f"dropping rows: {why}")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("healthwatch: %s (further problems are counted in monitor/dropped_rows)", message)

    # -- writer thread -----------------------------------------------------------------------
    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                if self._writer is not None and self.writes:
                    try:  # publish the open rollup buckets: the attempt ends here
                        self._writer.close()
                    except Exception as exc:  # noqa: BLE001 - rollups are derived; raw rows are safe
                        log.warning("healthwatch: closing the store writer failed: %s", exc)
                return
            try:
                self._write(item)
            except Exception as exc:  # noqa: BLE001 - the writer must never die
                self._drop(self._estimate_rows(item.steps, item.extras) + len(item.events), f"write failed: {exc}")
            finally:
                if item.done is not None:
                    item.done.set()

    def _get_writer(self) -> StoreWriter:
        if self._writer is None:
            init_store(self.root)
            self._writer = StoreWriter(self.root, self.run, attempt=self.attempt, rank=self.rank)
        return self._writer

    def _write_meta(self, writer: StoreWriter, item_events: list[dict[str, Any]]) -> None:
        if self._meta_written:
            return
        now = time.time()
        # Every attempt declares the run; the `runs` view keeps the first declaration.
        writer.write("runs", run_row(parent=self.parent, branch_step=self.branch_step, branch_tokens=self.branch_tokens,
                                     precision=self.precision, config=self.config or {}, created=now))
        start = self.start_step if self.start_step is not None else self._first_step
        if start is None:
            start = min((e["step"] for e in item_events), default=0)
        writer.write("attempts", attempt_row(attempt=self.attempt, start_step=start, started_at=now, reason=self.reason))
        self._meta_written = True

    def _write(self, item: _Flush) -> None:
        if item.event is not None:
            item.event.synchronize()
        writer = self._get_writer()
        if not item.steps and not item.extras and not item.events:
            return
        if self.writes:
            self._write_meta(writer, item.events)
        if item.events:
            ev = item.events
            writer.write("events", {k: [e[k] for e in ev] for k in ev[0]})
        if not item.steps and not item.extras:
            return
        flat = item.flat.numpy() if item.flat.numel() else np.zeros(0)
        spec = self.spec
        layout = self._collector.layout if self._collector is not None else None
        if layout is None:
            from healthwatch.hooks.collector import Layout

            layout = Layout(0, [], [], [], 0)
        rows = build_rows(
            flat, item.steps, item.extras, item.extras_offset, layout,
            [b.layer_type for b in spec.blocks] if spec else [],
            [b.residual for b in spec.blocks] if spec else [],
            self._dead, self.attempt, self.world, self.expert_load_every,
            [b.index for b in spec.blocks] if spec else None,
        )
        report = self.dropped_rows != self._reported_dropped and bool(item.steps)
        count = self.dropped_rows
        if report:
            last = item.steps[-1]
            rows.scalar(last.step, last.tokens, last.wall_time, "monitor/dropped_rows", float(count))
        if self.writes:
            written = self._write_tables(writer, rows, own_rows=int(report))
            if report and "scalars" in written:
                self._reported_dropped = count  # reported only once it is really in the store
        elif report:
            self._reported_dropped = count
        self._after_flush()

    def _write_tables(self, writer: StoreWriter, rows: Any, own_rows: int = 0) -> list[str]:
        """Write one flush's tables; returns those written.

        On a storage error the rows of the tables not written are counted as dropped (the
        ``own_rows`` report of earlier drops among them excluded: it is re-sent with the new total).
        """
        written = []
        tables = (("scalars", rows.scalars), ("layer_stats", rows.layers), ("expert_load", rows.load))
        try:
            for table, cols in tables:
                if len(cols["step"]):
                    writer.write(table, cols)
                    written.append(table)
        except OSError as exc:
            lost = sum(len(cols["step"]) for table, cols in tables if table not in written)
            self._drop(lost - (own_rows if "scalars" not in written else 0), f"cannot write to {self.root}: {exc}")
            return written
        for table in written:
            try:
                writer.compact_own(table)
            except Exception as exc:  # noqa: BLE001 - merging is an optimisation, never fatal
                log.debug("self-compaction of %s failed: %s", table, exc)
        return written

    def _after_flush(self) -> None:
        if self._alerts_spec is None or not self.writes:
            return
        try:
            if self._alerts is None:
                spec = self._alerts_spec
                if hasattr(spec, "after_flush"):
                    self._alerts = spec
                else:
                    from healthwatch.alerts import monitor_evaluator

                    self._alerts = monitor_evaluator(spec, self.root, self.run)
            transitions = self._alerts.after_flush(self.root, self.run) or []
        except Exception as exc:  # noqa: BLE001 - alerting must not break writing
            log.warning("healthwatch: alert evaluation failed: %s", exc)
            return
        if self.on_alert is not None:
            for t in transitions:
                try:
                    self.on_alert(t)
                except Exception as exc:  # noqa: BLE001 - a callback bug must not kill the writer
                    log.warning("healthwatch: on_alert callback raised: %s", exc)

    # -- lifecycle ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Monitor state to save with a checkpoint (trailing dead-expert windows, counters)."""
        self.flush(wait=True)
        return {
            "run": self.run,
            "attempt": self.attempt,
            "last_step": self._last_step,
            "last_tokens": self._last_tokens,
            "dropped_rows": self.dropped_rows,
            "dead": self._dead.state_dict() if self._dead is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict` (a resume keeps dead-expert windows intact)."""
        self.dropped_rows = int(state.get("dropped_rows", 0))
        self._reported_dropped = self.dropped_rows
        dead = state.get("dead")
        if dead:
            if self._dead is not None:
                self._dead.load_state_dict(dead)
            else:
                self._pending_dead_state = dict(dead)

    def close(self) -> None:
        """Flush everything, stop the writer thread and remove the hooks. Idempotent."""
        if self._closed:
            return
        try:
            self.flush(wait=True)
            if self._last_step >= 0:  # readers show the run as finished, not live
                self.event(END_EVENT, message="monitor closed")
        finally:
            self._closed = True
            if self._collector is not None:
                self._collector.detach()
            try:
                self._queue.put(None, timeout=30)
            except queue.Full:
                pass
            self._thread.join(timeout=120)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass
