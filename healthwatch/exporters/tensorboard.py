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
        self.last_step: int | None = None
        self._attempts = self.source.attempts_signature(run)
        #: Values written so far (scalars, tokens and aggregates).
        self.written = 0

    def _after_rollback(self) -> int | None:
        """Step after which to export: the last exported one, or earlier when a new attempt restarted before it."""
        sig = self.source.attempts_signature(self.run)
        after = self.last_step
        if sig != self._attempts:
            new = [start for a, start in sig if (a, start) not in self._attempts]
            if new and after is not None and min(new) <= after:
                after = min(new) - 1
            self._attempts = sig
        return after

    def export_new(self) -> int:
        """Write every step of the effective path after the last exported one; returns values written."""
        self.source.refresh()
        after = self._after_rollback()
        pb, spb = self._event_pb2, self._summary_pb2
        if self.last_step is not None and after is not None and after < self.last_step:
            restart = pb.Event(wall_time=time.time(), step=after + 1,
                               session_log=pb.SessionLog(status=pb.SessionLog.START))
            self._writer.add_event(restart)
        per_step: dict[int, list[tuple[str, float]]] = defaultdict(list)
        wall: dict[int, float] = {}
        tokens: dict[int, int] = {}
        for step, tok, name, value, wt in self.source.scalar_rows(self.run, after):
            per_step[step].append((name, value))
            tokens[step] = tok
            if wt is not None:
                wall[step] = max(wall.get(step, 0.0), wt)
        for step, metric, vmax, vmed, argmax in self.source.layer_aggregate_rows(self.run, after):
            per_step[step] += [(f"layers/{metric}/max", vmax), (f"layers/{metric}/median", vmed),
                               (f"layers/{metric}/argmax_layer", float(argmax))]
        n = 0
        now = time.time()
        for step in sorted(per_step):
            values = per_step[step]
            if step in tokens:
                values.append(("tokens", float(tokens[step])))
            summary = spb.Summary(value=[spb.Summary.Value(tag=tag, simple_value=v) for tag, v in values])
            self._writer.add_event(pb.Event(wall_time=wall.get(step, now), step=step, summary=summary))
            n += len(values)
        if per_step:
            self.last_step = max(per_step)
        elif after is not None and self.last_step is not None and after < self.last_step:
            self.last_step = after
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
