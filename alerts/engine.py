"""The evaluator: runs every rule's detector incrementally, advances the state machines, records
transitions in the store's ``alerts`` table and notifies sinks exactly once per transition.

Event sourcing and "never double-notify"
----------------------------------------
A transition is identified by ``(fingerprint, state, step)``: the fingerprint is a hash of the
rule, run, layer and labels, and the state machine is a deterministic function of the store's
effective rows, so every evaluator (a restarted one, a second daemon, the trainer's own) computes
the same transitions at the same steps. Before recording, an evaluator reads the ``alerts`` table
and drops transitions already recorded. It then writes its rows and **claims** each transition by
creating ``<store>/_alert_claims/run=<run>/<fingerprint>-<state>-<step>`` with ``O_CREAT|O_EXCL``:
the filesystem lets exactly one creator succeed, and only that evaluator notifies. Two evaluators
racing on the same transition may both write a row, but only one of them notifies. (An earlier
design compared the ``wall_time`` of read-back rows; that double-notifies when the writer with
the earlier timestamp publishes its segment after the other one has read back.)

What is left (honestly):

* A crash between writing a row and notifying loses that notification (at-most-once): the row
  says it was handled. Notifying before writing would instead risk duplicates.
* Claims rely on ``O_EXCL`` being atomic: true on local filesystems and NFSv3+, not on every
  network filesystem.
* Rows of a race are duplicated in the table (both writers keep theirs); readers take the latest
  row per fingerprint, so the state shown is unaffected.

Rollbacks: the state machine runs on ``*_effective`` rows, so after a rollback an alert recorded
on the superseded path may not recur. When the recorded state of an instance (at steps the
evaluator has reached) is pending/firing but the replay says otherwise, the evaluator records a
``resolved``/``inactive`` transition with ``detail`` saying so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from healthwatch.alerts.detectors import (
    NEVER,
    Snapshot,
    Sources,
    evaluate,
    evaluate_many,
    expr_lookback,
    uses_store,
)
from healthwatch.alerts.loader import load_rules
from healthwatch.alerts.rules import LoadedRule, RuleSet
from healthwatch.alerts.state import InstanceState, Timing, advance
from healthwatch.alerts.template import render
from healthwatch.alerts.transition import Transition, fingerprint
from healthwatch.query.runs import heartbeats
from healthwatch.schema import validate_run_name
from healthwatch.store import Store, StoreWriter
from healthwatch.store import fs as _store_fs
from healthwatch.store.segments import iter_run_dirs

log = logging.getLogger("healthwatch.alerts")

Backfill = Literal["latest", "all", "none"]
Start = Literal["history", "latest"]
_RANK_RUN = re.compile(r"\.rank\d+$")
#: A run whose last heartbeat is older than this is history, not a stalled live run.
STALL_MAX_AGE_S = 7 * 24 * 3600.0
#: Directory (under the store root) of the per-transition claim files: ``run=<run>/<fp>-<state>-<step>``.
CLAIMS_DIR = "_alert_claims"


@dataclass
class _Instance:
    """An alert instance the evaluator has seen: its rule, run, key layer, state."""

    rule: LoadedRule
    run: str
    layer: int | None
    labels: dict[str, str]
    fingerprint: str
    state: InstanceState


def default_evaluator_id() -> str:
    """``host:pid:random``: unique per evaluator process, readable in the ``alerts`` table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Evaluator:
    """Evaluates alert rules on a store, records transitions and notifies sinks.

    Args:
        store_root: the store directory (it may not exist yet; evaluation then finds nothing).
        rules: a :class:`RuleSet`, a rule-file path, a list of paths, or ``"default"``.
        sinks: objects with ``send(transitions)`` (see :mod:`healthwatch.alerts.sinks`).
        runs: runs to evaluate (default: every run in the store except per-rank ``<run>.rank<k>``).
        evaluator_id: recorded with each transition (default ``host:pid:random``).
        record: write transitions to the ``alerts`` table (False for dry runs such as backtests).
        backfill: what to notify for transitions found on history that existed before this
            evaluator first looked at a run: ``"latest"`` (only instances still pending/firing at
            the end), ``"all"``, or ``"none"``. Later transitions are always notified.
        sources: views to read (default the effective views; :meth:`Sources.attempt_path` for a
            backtest of a superseded attempt).
        history: how many computed transitions to keep in :attr:`history`.
        chunk_steps: steps per chunk when first evaluating a long history.
        start: ``"history"`` (default) replays each run from its first step, so every evaluator
            derives the same transitions at the same steps; ``"latest"`` starts at the newest step
            already logged (like Prometheus, which never looks back): start-up costs one window
            instead of the whole history (minutes for a million steps x 108 layers), but ``for``
            durations count from then and history before it is never alerted on.
    """

    def __init__(
        self,
        store_root: str | os.PathLike[str],
        rules: Any = "default",
        sinks: Iterable[Any] | None = None,
        runs: Sequence[str] | None = None,
        *,
        evaluator_id: str | None = None,
        record: bool = True,
        backfill: Backfill = "latest",
        start: Start = "history",
        sources: Sources | None = None,
        history: int = 100_000,
        chunk_steps: int = 20_000,
    ) -> None:
        self.root = Path(store_root)
        self.rules: RuleSet = load_rules(rules)
        self.sinks = list(sinks or [])
        self.runs = [validate_run_name(r) for r in runs] if runs is not None else None
        self.id = evaluator_id or default_evaluator_id()
        self.record = record
        if backfill not in ("latest", "all", "none"):
            raise ValueError(f"backfill must be 'latest', 'all' or 'none', got {backfill!r}")
        self.backfill = backfill
        if start not in ("history", "latest"):
            raise ValueError(f"start must be 'history' or 'latest', got {start!r}")
        self.start = start
        self.sources = sources or Sources()
        self.history: deque[Transition] = deque(maxlen=history)
        self.errors: dict[str, str] = {}
        self.evaluations = 0
        self._rank = int(hashlib.sha256(self.id.encode()).hexdigest()[:8], 16) % 100_000
        self._store: Store | None = None
        self._cursors: dict[str, dict[str, int]] = {r.name: {} for r in self.rules}
        self._instances: dict[str, _Instance] = {}
        self._writers: dict[str, StoreWriter] = {}
        self._lock = threading.RLock()
        self._last_version = -1
        self._snapshot: Snapshot | None = None
        self._seen: set[str] = set()
        self._loaded_hi: dict[str, int] = {}
        #: Transitions the last :meth:`evaluate_once` computed that are news to this process
        #: (recorded and notified by this evaluator or by another one): what a trainer callback gets.
        self.last_seen: list[Transition] = []
        #: Steps per chunk of a first evaluation over a long history (bounds memory).
        self.chunk_steps = chunk_steps
        #: How far behind the newest step a rule that never observed anything reads.
        self.horizon = max(chunk_steps, max((expr_lookback(r.rule.expr) for r in self.rules), default=0) * 2)

    # -- store -------------------------------------------------------------------------------
    @property
    def store(self) -> Store | None:
        """The read handle (opened on first use; None while the store does not exist)."""
        if self._store is None and _store_fs.store_exists(self.root):  # a directory, or an s3:// store
            self._store = Store(self.root)
        return self._store

    def close(self) -> None:
        """Close the store connection and drop the snapshot."""
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def discover_runs(self) -> list[str]:
        """Runs to evaluate now (the ``runs`` given, or every run with scalars or layer stats)."""
        if self.runs is not None:
            return list(self.runs)
        found: set[str] = set()
        for table in ("scalars", "layer_stats"):
            found.update(r for r, _ in iter_run_dirs(self.root, table))
        return sorted(r for r in found if not _RANK_RUN.search(r))

    # -- evaluation --------------------------------------------------------------------------
    def changed(self) -> bool:
        """True when the store has new files since the last evaluation (a cheap directory listing)."""
        store = self.store
        if store is None:
            return False
        store.refresh()
        return store.version != self._last_version

    def evaluate_once(self) -> list[Transition]:
        """Evaluate every rule on the steps logged since the last call; record and notify.

        Returns the transitions this call recorded first (pending and inactive included; what is
        *notified* is filtered by each rule's ``notify`` states and the backfill policy). A first
        evaluation over a long history proceeds in chunks of :attr:`chunk_steps` steps, so memory
        stays bounded.
        """
        with self._lock:
            self.last_seen = []
            store = self.store
            if store is None:
                return []
            store.refresh()
            self._last_version = store.version
            self.evaluations += 1
            runs = self.discover_runs()
            if not runs:
                return []
            first = {r for r in runs if r not in self._seen}
            self._seen.update(first)
            if self.start == "latest" and first:
                self._skip_history(store, sorted(first))
            new: list[Transition] = []
            upto, hi = self._first_chunk(store, runs)
            while True:
                self._load_snapshot(store, runs, upto)
                new.extend(self._evaluate_snapshot_rules(store, runs, first))
                if upto is None:
                    # gap/sql rules read the store, not the snapshot: run them once, on the last chunk.
                    for rule in self.rules:
                        if uses_store(rule.rule.expr):
                            new.extend(self._evaluate_rule(store, rule, runs, first))
                if upto is None:
                    break
                upto += self.chunk_steps
                if hi is None or upto >= hi:
                    upto = None
            new.extend(self._check_stalls(store, runs, time.time()))
            reached = {(rule.name, run): c for rule in self.rules for run, c in self._cursors[rule.name].items()}
            new.sort(key=lambda t: (t.step, t.run, t.group, t.alert, t.layer if t.layer is not None else -1))
            if self.record:
                recorded = self._recorded(store, runs)
                new = self._continuations(new, recorded)
                new.extend(self._reconcile(recorded, reached, {t.fingerprint for t in new}))
                done = {(fp, st, int(s)) for fp, st, s in recorded.select("fingerprint", "state", "step").iter_rows()}
                owned = self._write_and_claim(new, done)
            else:
                done = set()
                owned = new
            # What this evaluator saw happen, whoever recorded and notified it: the trainer's own
            # callback must hear of a transition even when a daemon on the same store claimed the
            # notification first. History already recorded before this evaluator looked is not news.
            self.last_seen = [t for t in new if not t.backfill or t.key not in done]
            self.history.extend(owned)
            self._notify(owned)
            return owned

    def _evaluate_snapshot_rules(self, store: Store, runs: list[str], first: set[str]) -> list[Transition]:
        """All snapshot rules in one statement; on error, one by one so only the broken rule fails."""
        rules = [r for r in self.rules if not uses_store(r.rule.expr)]
        items = [(r.rule.expr, {run: self._cursors[r.name].get(run, NEVER) for run in runs}) for r in rules]
        assert self._snapshot is not None
        try:
            frames = evaluate_many(self._snapshot, items)
        except Exception:  # noqa: BLE001 - isolate the failing rule below
            out: list[Transition] = []
            for rule in rules:
                out.extend(self._evaluate_rule(store, rule, runs, first))
            return out
        out = []
        for rule, obs in zip(rules, frames):
            self.errors.pop(rule.name, None)
            out.extend(self._observe(rule, obs, first))
        return out

    def _evaluate_rule(self, store: Store, rule: LoadedRule, runs: list[str], first: set[str]) -> list[Transition]:
        cursors = self._cursors[rule.name]
        cur = {r: cursors.get(r, NEVER) for r in runs}
        try:
            obs = evaluate(store, rule.rule.expr, cur, self.sources, self._snapshot)
        except Exception as exc:  # noqa: BLE001 - one broken rule must not stop the others
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self.errors.get(rule.name) != msg:
                log.error("alert rule %s failed: %s", rule.name, msg)
            self.errors[rule.name] = msg
            return []
        self.errors.pop(rule.name, None)
        return self._observe(rule, obs, first)

    def _observe(self, rule: LoadedRule, obs: pl.DataFrame, first: set[str]) -> list[Transition]:
        """Feed observations to the rule's instances and move its cursors past them."""
        cursors = self._cursors[rule.name]
        out = self._advance(rule, obs, first)
        if obs.height:
            for run, last in obs.group_by("run").agg(pl.col("step").max()).iter_rows():
                cursors[run] = max(int(last), cursors.get(run, NEVER))
        return out

    def _skip_history(self, store: Store, runs: list[str]) -> None:
        """``start="latest"``: put every rule's cursor of ``runs`` at the newest step logged."""
        # The scalars (a few per step) say where a run is; layer stats (hundreds per step) only
        # for a run that logs no scalars at all.
        rows = dict(store.sql(
            "SELECT run, max(step) FROM scalars_effective WHERE list_contains($runs, run) GROUP BY run",
            {"runs": runs},
        ).fetchall())
        missing = [r for r in runs if rows.get(r) is None]
        if missing:
            rows.update(store.sql(
                "SELECT run, max(step) FROM layer_stats_effective WHERE list_contains($runs, run) GROUP BY run",
                {"runs": missing},
            ).fetchall())
        for run, hi in rows.items():
            if hi is None:
                continue
            for rule in self.rules:
                self._cursors[rule.name][run] = int(hi)
            self._loaded_hi[run] = int(hi)

    def _first_chunk(self, store: Store, runs: list[str]) -> tuple[int | None, int | None]:
        """``(upto, hi)`` of the first chunk when some run is evaluated for the first time over a
        history longer than :attr:`chunk_steps`; ``(None, None)`` otherwise (one pass)."""
        fresh = [r for r in runs if r not in self._loaded_hi]
        if not fresh:
            return None, None
        row = store.sql(
            "SELECT min(step), max(step) FROM (SELECT step FROM scalars_effective WHERE list_contains($runs, run) "
            "UNION ALL SELECT step FROM layer_stats_effective WHERE list_contains($runs, run))",
            {"runs": fresh},
        ).fetchone()
        if row is None or row[0] is None or int(row[1]) - int(row[0]) <= self.chunk_steps:
            return None, None
        return int(row[0]) + self.chunk_steps, int(row[1])

    def _load_snapshot(self, store: Store, runs: list[str], upto: int | None) -> None:
        """Copy the rows every snapshot rule still needs (its cursor minus its lookback)."""
        starts: dict[str, int] = {}
        for run in runs:
            floor = self._loaded_hi.get(run)
            need: list[int] = []
            for rule in self.rules:
                if uses_store(rule.rule.expr):
                    continue
                c = self._cursors[rule.name].get(run)
                if c is not None:
                    need.append(c - expr_lookback(rule.rule.expr))
                elif floor is not None:
                    # A rule that never observed anything here (its metric is not logged, or its
                    # window never filled) already saw every loaded step: it needs only the new
                    # steps plus its own lookback. (Reading a fixed horizon back instead re-read
                    # ~20k steps of every layer on each evaluation: 4 s per evaluation at 108 layers.)
                    need.append(floor - expr_lookback(rule.rule.expr))
                else:
                    need.append(NEVER)
            starts[run] = min(need) if need else NEVER
        if self._snapshot is None:
            self._snapshot = Snapshot()
        self._snapshot.load(store, starts, upto, self.sources)
        his = self._snapshot.con.sql(
            "SELECT run, max(step) FROM (SELECT run, step FROM scalars_effective UNION ALL "
            "SELECT run, step FROM layer_stats_effective) GROUP BY run"
        ).fetchall()
        for run, h in his:
            if h is not None:
                self._loaded_hi[run] = max(int(h), self._loaded_hi.get(run, NEVER))

    def _advance(self, rule: LoadedRule, obs: pl.DataFrame, first: set[str]) -> list[Transition]:
        out: list[Transition] = []
        if obs.height == 0:
            return out
        r = rule.rule
        timing = Timing(r.for_, r.keep_firing_for, r.cooldown)
        # obs is sorted by (run, layer, step): cut it where (run, layer) changes.
        ids = obs.select(pl.struct("run", "layer").rle_id()).to_series().to_numpy()
        cuts = np.concatenate(([0], np.flatnonzero(np.diff(ids)) + 1, [obs.height]))
        steps_all = obs["step"].to_numpy()
        active_all = obs["active"].to_numpy()
        if r.min_step:
            active_all = active_all & (steps_all >= r.min_step)  # before min_step: not this rule's business
        runs = obs["run"]
        layers = obs["layer"]
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            run, layer = runs[a], layers[a]
            inst = self._instance(rule, str(run), None if layer is None else int(layer))
            changes = advance(inst.state, timing, steps_all[a:b], active_all[a:b])
            backfill = str(run) in first
            for state, idx in changes:
                row = obs.row(a + idx, named=True)
                out.append(self._transition(inst, state, row, backfill))
        return out

    def _check_stalls(self, store: Store, runs: list[str], now: float) -> list[Transition]:
        """Stall rules (``no_data_after_s``): fire on a live run whose newest heartbeat is older than
        that; mark the run's other active instances ``no_data``; resolve when a newer heartbeat arrives.

        Wall-clock based on purpose: a run hung in a collective logs no step, so step-indexed rules
        see nothing new and would hold their state for ever without saying why.
        """
        rules = [r for r in self.rules if r.rule.no_data_after_s is not None]
        if not rules or not runs:
            return []
        out: list[Transition] = []
        for run, (step, beat, closed_step) in heartbeats(store, runs).items():
            age = now - beat
            ended = closed_step is not None and closed_step >= step
            for rule in rules:
                after = float(rule.rule.no_data_after_s)  # type: ignore[arg-type]
                stalled = not ended and after <= age <= STALL_MAX_AGE_S
                inst = self._instance(rule, str(run), None)
                row = {"step": int(step), "tokens": None, "value": age, "at_layer": None,
                       "detail": f"no new step for {age / 60:.1f} min (last heartbeat at step {int(step)})"}
                if stalled and inst.state.state != "firing":
                    prev = inst.state.state
                    inst.state.state, inst.state.pending_since, inst.state.last_true = "firing", int(step), int(step)
                    out.append(self._transition(inst, "firing", row, backfill=False, previous=prev))
                    for other in list(self._instances.values()):
                        if other.run == run and other is not inst and other.state.active:
                            nd = {"step": int(step), "tokens": None, "value": None, "at_layer": other.layer,
                                  "detail": f"no data: the run made no step for {age / 60:.1f} min "
                                            f"(state {other.state.state} held, not resolved)"}
                            out.append(self._transition(other, "no_data", nd, backfill=False,
                                                        previous=other.state.state))
                elif not stalled and inst.state.state == "firing" and (ended or int(step) > (inst.state.last_true or -1)):
                    inst.state.state, inst.state.resolved_at = "resolved", int(step)
                    row["detail"] = "the run closed" if ended else f"steps again (heartbeat at step {int(step)})"
                    out.append(self._transition(inst, "resolved", row, backfill=False, previous="firing"))
        return out

    def _instance(self, rule: LoadedRule, run: str, layer: int | None) -> _Instance:
        labels = dict(rule.rule.labels)
        fp = fingerprint(rule.group, rule.rule.alert, run, layer, labels)
        inst = self._instances.get(fp)
        if inst is None:
            full = {**labels, "alertname": rule.rule.alert, "group": rule.group, "run": run,
                    "severity": rule.rule.severity}
            if layer is not None:
                full["layer"] = str(layer)
            inst = _Instance(rule, run, layer, full, fp, InstanceState())
            self._instances[fp] = inst
        return inst

    def _transition(self, inst: _Instance, state: str, row: dict[str, Any], backfill: bool, previous: str | None = None) -> Transition:
        r = inst.rule.rule
        value = row.get("value")
        values = {
            "alert": r.alert, "group": inst.rule.group, "run": inst.run, "step": row["step"],
            "tokens": row.get("tokens"), "value": value, "layer": row.get("at_layer"),
            "severity": r.severity, "state": state, "detail": row.get("detail"),
        }
        annotations = {k: render(v, values, inst.labels) for k, v in r.annotations.items()}
        prev = previous
        if prev is None:
            prev = {"pending": "inactive", "firing": "pending" if r.for_ else "inactive",
                    "resolved": "firing", "inactive": "pending"}[state]
        return Transition(
            alert=r.alert, group=inst.rule.group, state=state, previous=prev, severity=r.severity,
            run=inst.run, step=int(row["step"]), tokens=None if row.get("tokens") is None else int(row["tokens"]),
            layer=None if row.get("at_layer") is None else int(row["at_layer"]),
            value=None if value is None else float(value), labels=dict(inst.labels), annotations=annotations,
            fingerprint=inst.fingerprint, detail=row.get("detail"), evaluator=self.id, backfill=backfill,
        )

    # -- recording ---------------------------------------------------------------------------
    def _recorded(self, store: Store, runs: list[str]) -> pl.DataFrame:
        if not runs:
            return pl.DataFrame()
        return store.sql(
            'SELECT run, alert, "group", fingerprint, state, step, layer, evaluator, wall_time FROM alerts '
            "WHERE list_contains(?::VARCHAR[], run)",
            [runs],
        ).pl()

    @staticmethod
    def _continuations(new: list[Transition], recorded: pl.DataFrame) -> list[Transition]:
        """Un-mark as backfill the transition that ends an instance the store records as active.

        A restarted evaluator replays history it had not seen in *this* process; the backfill policy
        (e.g. ``latest``) must not swallow the resolution of an alert whose firing some evaluator
        already recorded (and so notified): that resolution is news. ``new`` is sorted by step.
        """
        if recorded.height == 0 or not any(t.backfill for t in new):
            return new
        last = {fp: (int(step), state) for fp, step, state in
                recorded.sort(["step", "wall_time"]).group_by("fingerprint")
                .agg(pl.col("step").last(), pl.col("state").last()).iter_rows()}
        done: set[str] = set()
        out = []
        for t in new:
            rec = last.get(t.fingerprint)
            if (t.backfill and t.fingerprint not in done and rec is not None and rec[1] in ("pending", "firing")
                    and t.step > rec[0]):
                done.add(t.fingerprint)
                t = replace(t, backfill=False)
            out.append(t)
        return out

    def _reconcile(self, recorded: pl.DataFrame, reached: dict[tuple[str, str], int], fresh: set[str]) -> list[Transition]:
        """Close instances the store says are active but the effective history no longer supports."""
        if recorded.height == 0:
            return []
        by_name = {(r.group, r.rule.alert): r for r in self.rules}
        latest = (
            recorded.sort(["step", "wall_time"])
            .group_by("fingerprint")
            .agg(pl.all().last())
        )
        out: list[Transition] = []
        for row in latest.iter_rows(named=True):
            rule = by_name.get((row["group"], row["alert"]))
            if rule is None or row["fingerprint"] in fresh or row["state"] not in ("pending", "firing"):
                continue
            upto = reached.get((rule.name, row["run"]))
            if upto is None or upto < row["step"]:
                continue  # this evaluator has not reached that step yet
            inst = self._instances.get(row["fingerprint"])
            if inst is not None and inst.state.state == row["state"]:
                continue
            if inst is not None and inst.state.active:
                continue  # active here too (e.g. pending vs firing at different steps): no contradiction
            if inst is None:
                inst = self._instance_for(rule, row["run"], row["layer"], row["fingerprint"])
                if inst is None:
                    continue
            state = "resolved" if row["state"] == "firing" else "inactive"
            t = self._transition(inst, state, {"step": upto, "tokens": None, "value": None, "at_layer": row["layer"],
                                               "detail": f"recorded {row['state']} at step {row['step']} is not on the "
                                                         "effective history (superseded by a rollback or a rule change)"},
                                 backfill=False, previous=row["state"])
            if state == "resolved":
                inst.state.state, inst.state.resolved_at = "resolved", upto
            out.append(t)
        return out

    def _instance_for(self, rule: LoadedRule, run: str, layer: Any, fp: str) -> _Instance | None:
        """The instance of ``rule`` on ``run`` whose fingerprint is ``fp`` (per-layer or not)."""
        for key in ((None if layer is None else int(layer)), None):
            if fingerprint(rule.group, rule.rule.alert, run, key, dict(rule.rule.labels)) == fp:
                return self._instance(rule, run, key)
        return None

    def _writer(self, run: str) -> StoreWriter:
        w = self._writers.get(run)
        if w is None:
            w = self._writers[run] = StoreWriter(self.root, run, attempt=0, rank=self._rank)
        return w

    def _write_and_claim(self, new: list[Transition], done: set[tuple[str, str, int]]) -> list[Transition]:
        """Record the transitions not in ``done`` (keys already in the store); return those this evaluator claims."""
        cands = [t for t in new if t.key not in done]
        if not cands:
            return []
        now = time.time()
        cands = [replace(t, wall_time=now) for t in cands]
        by_run: dict[str, list[Transition]] = {}
        for t in cands:
            by_run.setdefault(t.run, []).append(t)
        for run, ts in by_run.items():
            rows = [t.to_row() for t in ts]
            cols = {k: [r[k] for r in rows] for k in rows[0]}
            w = self._writer(run)
            w.write("alerts", cols)
            try:
                w.compact_own("alerts")
            except Exception as exc:  # noqa: BLE001 - merging is an optimisation only
                log.debug("compacting alert segments failed: %s", exc)
        # Claim: exactly one evaluator creates the claim file of a transition (O_CREAT|O_EXCL is
        # atomic), and only that one notifies. (Comparing wall times of read-back rows is not
        # enough: a writer that took its timestamp earlier but published later makes both notify.)
        return [t for t in cands if self._claim(t)]

    def _claim(self, t: Transition) -> bool:
        """Atomically claim the notification of ``t``; False when another evaluator holds it."""
        d = self.root / CLAIMS_DIR / f"run={t.run}"
        path = d / f"{t.fingerprint}-{t.state}-{int(t.step)}"
        if _store_fs.is_remote(d):  # object storage: one create-only PUT (If-None-Match) is the claim
            return _store_fs.FS.create_exclusive(str(path), f"{self.id}\n".encode())
        d.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{self.id}\n".encode())
        finally:
            os.close(fd)
        return True

    # -- notifying ---------------------------------------------------------------------------
    def _notify(self, owned: list[Transition]) -> None:
        if not self.sinks or not owned:
            return
        rules = {(r.group, r.rule.alert): r.rule for r in self.rules}
        last_backfill: dict[str, Transition] = {}
        for t in owned:
            if t.backfill:
                last_backfill[t.fingerprint] = t
        out = []
        for t in owned:
            rule = rules.get((t.group, t.alert))
            if rule is None or t.state not in rule.notify:
                continue
            if t.backfill:
                if self.backfill == "none":
                    continue
                if self.backfill == "latest" and (last_backfill.get(t.fingerprint) is not t or t.state not in ("pending", "firing")):
                    continue
            out.append(t)
        if not out:
            return
        for sink in self.sinks:
            try:
                sink.send(out)
            except Exception as exc:  # noqa: BLE001 - a failing sink must not stop evaluation or other sinks
                log.error("alert sink %s failed: %s", getattr(sink, "name", type(sink).__name__), exc)

    # -- state -------------------------------------------------------------------------------
    def active_alerts(self) -> list[dict[str, Any]]:
        """Instances now pending or firing: ``{alert, group, run, layer, state, since, fingerprint}``."""
        with self._lock:
            return [
                {"alert": i.rule.rule.alert, "group": i.rule.group, "run": i.run, "layer": i.layer,
                 "state": i.state.state, "since": i.state.pending_since, "fingerprint": i.fingerprint,
                 "severity": i.rule.rule.severity}
                for i in self._instances.values() if i.state.active
            ]

    def cursor(self, rule: str, run: str) -> int | None:
        """Last step evaluated for ``rule`` (``group/alert``) on ``run``, or None."""
        return self._cursors.get(rule, {}).get(run)

    # -- daemon ------------------------------------------------------------------------------
    def watch(self, interval: float = 5.0, stop: threading.Event | None = None, poll: float | None = None,
              max_evaluations: int | None = None) -> None:
        """Evaluate until ``stop`` is set: at once when new segments appear (checked every ``poll``
        seconds, default ``min(0.25, interval / 4)``) and at least every ``interval`` seconds.

        Watching the directory listing (cheap) instead of sleeping a full interval keeps the
        latency from a flush to its notification well under one interval.
        """
        stop = stop or threading.Event()
        poll = poll if poll is not None else min(0.25, max(0.01, interval / 4))
        last = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if self.changed() or now - last >= interval:
                try:
                    self.evaluate_once()
                except Exception as exc:  # noqa: BLE001 - the daemon keeps going; the error is logged
                    log.error("alert evaluation failed: %s", exc)
                last = time.monotonic()
                if max_evaluations is not None and self.evaluations >= max_evaluations:
                    return
            stop.wait(poll)


def transitions_frame(transitions: Iterable[Transition]) -> pl.DataFrame:
    """Transitions as a polars frame (one row each, labels/annotations as JSON text)."""
    rows = [{**t.to_row(), "run": t.run, "previous": t.previous, "detail": t.detail} for t in transitions]
    if not rows:
        return pl.DataFrame(schema={"run": pl.Utf8, "alert": pl.Utf8, "state": pl.Utf8, "step": pl.Int64})
    return pl.DataFrame(rows)
