"""TensorBoard mirror of a run (``healthwatch export tensorboard``).

Writes TensorBoard event files holding, per step of the run's effective path: every scalar under
its own name (``loss/train``, ``loss/mtp_2``, ``grad_norm/total``, …), the cumulative ``tokens``,
and per layer metric the aggregates ``layers/<metric>/max``, ``layers/<metric>/median`` and
``layers/<metric>/argmax_layer``. Values are TensorBoard ``simple_value`` (float32); wall times
are the store's. W&B, Aim and others can sync these event files.

``follow`` tails a live run. After a rollback (a new attempt starting at or before a step
already exported) it writes a ``SessionLog.START`` event at the new attempt's start step (the
way TensorFlow marks a restart) and re-exports from there: TensorBoard's readers drop the events
at steps ≥ that step, so the diverged path disappears from the charts.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from healthwatch.exporters.source import StoreSource


def _event_writer(out: Path) -> Any:
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as exc:
        raise ImportError(
            f"exporting to TensorBoard needs the tensorboard package (pip install 'healthwatch[tensorboard]'): {exc}"
        ) from exc
    out.mkdir(parents=True, exist_ok=True)
    return EventFileWriter(str(out), max_queue_size=1000, flush_secs=1), event_pb2, summary_pb2


class TensorBoardExporter:
    """Mirrors one run of a store into a TensorBoard log directory (see the module docstring)."""

    def __init__(self, store: str | os.PathLike[str] | None, run: str, out: str | os.PathLike[str]) -> None:
        self.source = StoreSource(store, runs=[run], per_rank=True)
        self.source.require_run(run)
        self.run = run
        self.out = Path(out)
        self._writer, self._event_pb2, self._summary_pb2 = _event_writer(self.out)
        # Per table: the last step exported. The tables of one flush land as separate segments, so
        # a read may see a step's scalars before its layer stats; each table keeps its own floor.
        self._after: dict[str, int | None] = {"scalars": None, "layers": None}
        self._attempts = self.source.attempts_signature(run)
        #: Values written so far (scalars, tokens and aggregates).
        self.written = 0

    @property
    def last_step(self) -> int | None:
        """The newest step exported (any table), or None."""
        done = [v for v in self._after.values() if v is not None]
        return max(done) if done else None

    def _check_rollback(self) -> None:
        """On a new attempt that restarts at or before an exported step: mark the restart, lower the floors."""
        sig = self.source.attempts_signature(self.run)
        if sig == self._attempts:
            return
        new = [start for a, start in sig if (a, start) not in self._attempts]
        self._attempts = sig
        last = self.last_step
        if not new or last is None or min(new) > last:
            return
        restart = min(new)
        pb = self._event_pb2
        # TensorBoard's readers drop every event at steps >= a START marker's step.
        self._writer.add_event(pb.Event(wall_time=time.time(), step=restart,
                                        session_log=pb.SessionLog(status=pb.SessionLog.START)))
        for table, floor in self._after.items():
            self._after[table] = None if floor is None else min(floor, restart - 1)

    def export_new(self) -> int:
        """Write every step of the effective path after the last exported one; returns values written."""
        self.source.refresh()
        self._check_rollback()
        pb, spb = self._event_pb2, self._summary_pb2
        per_step: dict[int, list[tuple[str, float]]] = defaultdict(list)
        wall: dict[int, float] = {}
        for step, tok, name, value, wt in self.source.scalar_rows(self.run, self._after["scalars"]):
            if not per_step[step]:
                per_step[step].append(("tokens", float(tok)))
            per_step[step].append((name, value))
            if wt is not None:
                wall[step] = max(wall.get(step, 0.0), wt)
            self._after["scalars"] = max(step, self._after["scalars"] or step)
        for step, metric, vmax, vmed, argmax in self.source.layer_aggregate_rows(self.run, self._after["layers"]):
            per_step[step] += [(f"layers/{metric}/max", vmax), (f"layers/{metric}/median", vmed),
                               (f"layers/{metric}/argmax_layer", float(argmax))]
            self._after["layers"] = max(step, self._after["layers"] or step)
        n = 0
        now = time.time()
        for step in sorted(per_step):
            values = per_step[step]
            summary = spb.Summary(value=[spb.Summary.Value(tag=tag, simple_value=v) for tag, v in values])
            self._writer.add_event(pb.Event(wall_time=wall.get(step, now), step=step, summary=summary))
            n += len(values)
        self._writer.flush()
        self.written += n
        return n

    def follow(self, interval: float = 5.0, stop: threading.Event | None = None) -> None:
        """Export new steps every ``interval`` seconds until ``stop`` is set."""
        stop = stop or threading.Event()
        while True:
            self.export_new()
            if stop.wait(interval):
                self.export_new()
                return

    def close(self) -> None:
        """Flush and close the event file and the store."""
        self._writer.close()
        self.source.close()
