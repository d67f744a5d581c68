"""kill -9 of a training process at random moments: the store stays readable and loses little.

One run is trained, killed with SIGKILL at a seeded random moment, resumed from its last
checkpoint (a new attempt), killed again, … 22 times, then trained to a clean finish. After
every kill:

* the store opens and every visible segment reads (pyarrow, file by file); nothing is skipped;
* no temporary file is taken for data: the views read exactly the published segments;
* the killed attempt's rows are a subset of what it logged, each exactly once, whole steps only;
  every step up to its last completed flush (noted by the worker when the Monitor's writer
  thread returns) and up to its last checkpoint (``Monitor.state_dict()``, which waits for the
  writer) is there, and only a tail is missing: rows lost ≤ rows logged since the last
  completed flush.

At the end the effective view holds every step exactly once across all attempts, and
compaction (which must not wait on locks left by killed processes) keeps every row.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import HERE, child_env, read_every_segment, tmp_files, wait_for

import healthwatch as hw
from healthwatch.schema import TABLES
from healthwatch.store import compact_store
from healthwatch.store.segments import LOCK_NAME, MANIFEST_PREFIX, merge_lock

pytestmark = pytest.mark.slow

TRIALS = 22
SEED = 20261123
RUN = "crashy"
STEP_TABLES = ("scalars", "layer_stats", "expert_load")
EXPERT_LOAD_EVERY = 10


@dataclass
class Trial:
    """What one training process logged before it died (parsed from its side file)."""

    k: int
    attempt: int | None = None
    start: int = 0
    steps: list[int] = field(default_factory=list)
    checkpoint: int | None = None
    flushed: int | None = None  # last step of the last flush the writer thread finished
    done: bool = False

    @classmethod
    def parse(cls, k: int, path: Path) -> Trial:
        """Read ``trial-K.log`` written by the worker."""
        t = cls(k)
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "A":
                t.attempt, t.start = int(parts[1]), int(parts[2])
            elif parts[0] == "S":
                t.steps.append(int(parts[1]))
            elif parts[0] == "C":
                t.checkpoint = int(parts[1])
            elif parts[0] == "W":
                t.flushed = max(int(parts[1]), t.flushed if t.flushed is not None else -1)
            elif parts[0] == "D":
                t.done = True
        return t


class Worker:
    """The forking trainer (``kill9_worker.py``) and a reader thread for its answers."""

    def __init__(self, store: Path, logdir: Path, stderr: Path) -> None:
        self.logdir = logdir
        self._err = open(stderr, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "kill9_worker.py"), str(store), RUN, str(logdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, env=child_env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.expect("ready", timeout=180) == ["ready"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def expect(self, word: str, timeout: float = 120) -> list[str]:
        """The next answer line, which must start with ``word``."""
        line = self.lines.get(timeout=timeout)
        assert line.split()[0] == word, f"worker said {line!r}, expected {word!r}"
        return line.split()

    def start(self, k: int, start: int, steps: int, seed: int, hold: bool = False) -> int:
        """Fork trial ``k`` (``hold``: it waits to be killed after its steps); returns its pid."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"start {k} {start} {steps} {seed} {int(hold)}\n")
        self.proc.stdin.flush()
        return int(self.expect("pid")[2])

    def close(self) -> None:
        """Stop the worker."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self._err.close()


def _rows_per_step(table: str, step: int, per_step: dict[str, int]) -> int:
    if table == "expert_load":
        return per_step[table] if step % EXPERT_LOAD_EVERY == 0 else 0
    return per_step[table]


def check_store_after_kill(root: Path, t: Trial, per_step: dict[str, int]) -> dict[str, Any]:
    """Every promise of the module docstring for one killed trial; returns its measured figures."""
    store = hw.open_store(root)  # opens: no half-written metadata, no lock to wait for
    try:
        rows = read_every_segment(store)  # every visible segment reads
        visible = {str(p) for table in TABLES for p in store.files(table)}
        leftovers = tmp_files(root)
        assert not visible & {str(p) for p in leftovers}
        for table in TABLES:  # the views read exactly the published segments: no temp file as data
            view = "runs_raw" if table == "runs" else table  # `runs` keeps each run's first declaration
            assert store.sql(f"SELECT count(*) FROM {view}").fetchone() == (rows[table],), table
        assert not store.bad_files, store.bad_files
        assert store.sql("SELECT count(*) FROM (SELECT DISTINCT attempt FROM attempts WHERE run = ?)",
                         [RUN]).fetchone()[0] == store.sql(
            "SELECT count(*) FROM attempts WHERE run = ?", [RUN]).fetchone()[0], "an attempt recorded twice"

        logged = set(t.steps)
        # Written for sure: every step up to the last checkpoint and up to the last completed flush.
        marks = [m for m in (t.checkpoint, t.flushed) if m is not None]
        confirmed = {s for s in logged if marks and s <= max(marks)}
        lost_rows = since_flush_rows = lost_steps = 0
        if t.attempt is not None:
            dup = store.sql(
                "SELECT count(*) FROM (SELECT step, name FROM scalars WHERE run = ? AND attempt = ? "
                "GROUP BY ALL HAVING count(*) > 1)", [RUN, t.attempt]).fetchone()[0]
            assert dup == 0, f"trial {t.k}: {dup} scalar rows stored twice"
            for table in STEP_TABLES:
                # Counted: the per-step rows. Left out: the Monitor's wall-clock heartbeat (one per
                # flush, on its last step: which step depends on the time-based flush) and the layer
                # signals sampled every `signals_every` steps (router entropy, …).
                extra = {"scalars": " AND name <> 'monitor/heartbeat'",
                         "layer_stats": " AND metric IN ('wgrad_norm', 'resid_rms', 'resid_rms_max', 'maxvio', "
                                        "'dead_experts')"}.get(table, "")
                counts = dict(store.sql(
                    f"SELECT step, count(*) FROM {table} WHERE run = ? AND attempt = ?{extra} GROUP BY step",
                    [RUN, t.attempt]).fetchall())
                assert set(counts) <= logged, f"trial {t.k}: {table} has steps never logged"
                for step, n in counts.items():  # whole steps only: a flush is never half visible
                    assert n == _rows_per_step(table, step, per_step), (t.k, table, step, n)
                missing_confirmed = {s for s in confirmed if _rows_per_step(table, s, per_step)} - set(counts)
                assert not missing_confirmed, f"trial {t.k}: flushed/checkpointed steps lost from {table}"
                lost = logged - set(counts)
                present = set(counts)
                lost_with_rows = {s for s in lost if _rows_per_step(table, s, per_step)}
                # Only a tail is lost: no step is missing before a step that was written.
                assert not present or not lost_with_rows or max(present) < min(lost_with_rows), (
                    f"trial {t.k}: {table} lost steps {sorted(lost_with_rows)[:5]} before written step {max(present)}")
                lost_rows += sum(_rows_per_step(table, s, per_step) for s in lost)
                since_flush_rows += sum(_rows_per_step(table, s, per_step) for s in logged - confirmed)
                if table == "scalars":
                    lost_steps = len(lost)
            assert lost_rows <= since_flush_rows
        names = {p.name for p in root.rglob("*")}
        return {
            "lost_rows": lost_rows, "lost_steps": lost_steps, "since_flush_rows": since_flush_rows,
            "tmp_left": len(leftovers), "manifest_left": any(n.startswith(MANIFEST_PREFIX) for n in names),
            "lock_left": LOCK_NAME in names,
        }
    finally:
        store.close()


def test_kill9_at_random_moments_loses_only_unflushed_rows(tmp_path: Path) -> None:
    """22 seeded SIGKILLs of a real training process, each resumed as a new attempt."""
    rng = random.Random(SEED)
    root, logdir = tmp_path / "store", tmp_path / "logs"
    logdir.mkdir()
    per_step = {"scalars": 8, "layer_stats": 16, "expert_load": 2}  # toy model: 8 scalars, 4 blocks, 2 routers
    worker = Worker(root, logdir, tmp_path / "worker.stderr")
    figures: list[dict[str, Any]] = []
    start, attempts_seen = 0, set()
    t0 = time.monotonic()
    try:
        for k in range(TRIALS):
            kill_after = rng.randint(0, 22)  # steps handed to the Monitor before the kill (0: while starting)
            jitter = rng.uniform(0.0, 0.04)  # and a random moment inside that step / the writer's work
            pid = worker.start(k, start, 40, seed=k, hold=True)  # never ends before the kill
            log = logdir / f"trial-{k:03d}.log"

            def progressed(k: int = k, log: Path = log, kill_after: int = kill_after) -> bool:
                t = Trial.parse(k, log)
                return t.attempt is not None and len(t.steps) >= kill_after

            wait_for(progressed, 120, f"trial {k} to log {kill_after} steps")
            time.sleep(jitter)  # the fault's random moment (not a wait for a condition)
            os.kill(pid, signal.SIGKILL)
            assert worker.expect("exit")[2] == "-9", f"trial {k} ended before the kill"
            t = Trial.parse(k, log)
            assert not t.done
            fig = check_store_after_kill(root, t, per_step)
            fig.update(trial=k, attempt=t.attempt, logged=len(t.steps), checkpoint=t.checkpoint)
            figures.append(fig)
            attempts_seen.add(t.attempt)
            # Resume like a trainer: from the last checkpoint (or from the same start without one).
            start = t.checkpoint + 1 if t.checkpoint is not None else start

        # A last, clean attempt: resumes, trains 25 steps, closes.
        final_k = TRIALS
        pid = worker.start(final_k, start, 25, seed=final_k)
        code = worker.expect("exit", timeout=180)[2]
        final = Trial.parse(final_k, logdir / f"trial-{final_k:03d}.log")
        assert code == "0" and final.done, (tmp_path / "worker.stderr").read_text()[-3000:]
    finally:
        worker.close()
    elapsed = time.monotonic() - t0
    stderr = (tmp_path / "worker.stderr").read_text()
    assert "Traceback" not in stderr, stderr[-3000:]

    store = hw.open_store(root)
    end = final.steps[-1]
    # Restarting opened a new attempt each time: numbered 1, 2, … after every attempt that wrote
    # something (a process killed before its first write leaves no trace, and its number is reused).
    numbers = [a for (a,) in store.sql("SELECT attempt FROM attempts WHERE run = ? ORDER BY attempt",
                                       [RUN]).fetchall()]
    assert numbers == list(range(1, final.attempt + 1)), numbers
    assert final.attempt >= len(attempts_seen - {None})
    eff = store.sql("SELECT step, count(*) FROM scalars_effective WHERE run = ? AND name = 'loss/train' "
                    "GROUP BY step ORDER BY step", [RUN]).fetchall()
    assert [s for s, _ in eff] == list(range(end + 1)), "the effective history has a hole or an extra step"
    assert all(n == 1 for _, n in eff), "a step is effective twice"
    before = store.sql("SELECT count(*), bit_xor(hash(step, name, attempt, value)) FROM scalars_all WHERE run = ?", [RUN]).fetchone()

    # Compaction must not be stopped by a merge lock left by a killed process: every table ends in
    # one file and no lock is left (that a dead holder's lock is taken over without waiting is
    # the next test's; the duration printed below is for the record, never asserted).
    c0 = time.monotonic()
    compact_store(root)
    compact_s = time.monotonic() - c0
    for table in STEP_TABLES:
        assert len(store.files(table, RUN)) == 1, f"{table} was not compacted (a stale lock?)"
    assert store.sql("SELECT count(*), bit_xor(hash(step, name, attempt, value)) FROM scalars_all WHERE run = ?", [RUN]).fetchone() == before
    assert not list(root.rglob(LOCK_NAME)) and not list(root.rglob(f"{MANIFEST_PREFIX}*"))

    max_lost = max(f["lost_rows"] for f in figures)
    summary = (
        f"kill -9 trials={TRIALS} max_rows_lost={max_lost} "
        f"max_steps_lost={max(f['lost_steps'] for f in figures)} "
        f"max_rows_since_last_completed_flush={max(f['since_flush_rows'] for f in figures)} "
        f"kills_leaving_tmp={sum(f['tmp_left'] > 0 for f in figures)} "
        f"kills_leaving_manifest={sum(bool(f['manifest_left']) for f in figures)} "
        f"kills_leaving_lock={sum(bool(f['lock_left']) for f in figures)} "
        f"attempts={final.attempt} final_steps={end + 1} compact_s={compact_s:.1f} elapsed_s={elapsed:.0f}"
    )
    print(summary)  # the figures quoted in RELIABILITY.md (pytest -rP shows them)


def test_merge_lock_of_a_killed_process_is_taken_over_at_once(tmp_path: Path) -> None:
    """A process killed while holding a directory's merge lock does not block merging for minutes."""
    directory = tmp_path / "table=scalars" / "run=x"
    directory.mkdir(parents=True)
    code = (
        "import sys; from pathlib import Path; from healthwatch.store.segments import merge_lock\n"
        f"with merge_lock(Path({str(directory)!r})) as ok:\n"
        "    print('locked' if ok else 'busy', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=child_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with merge_lock(directory, blocking=False) as ok:
            assert not ok, "a live holder's lock must be respected"
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        # Taken over at once: a single non-blocking attempt (no retry, no waiting) gets it.
        with merge_lock(directory, blocking=False) as ok:
            assert ok, "a dead process's lock was not taken over by a non-blocking attempt"
    finally:
        if holder.poll() is None:
            holder.kill()
