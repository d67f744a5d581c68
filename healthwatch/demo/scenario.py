"""``healthwatch demo``: the reference case, end to end, on a laptop CPU.

1. Train the main NVFP4 run with the ``ultra`` fault from ``onset``: MTP starvation, early
   residual growth and router collapse, then a learning-rate excursion that diverges it.
2. The alert engine (default pack) runs in the Monitor's writer thread; a critical alert asks the
   trainer to stop (the trainer's own divergence check is the backstop).
3. Roll back to the last checkpoint before the first alert (a new attempt), fault removed, train on.
4. Branch three BF16 ablations from three checkpoints and train each for a fixed token budget.
5. Compact the store (rollups for whole-run charts).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from healthwatch.demo.faults import make_fault
from healthwatch.demo.trainer import TrainConfig, Trainer
from healthwatch.hooks.monitor import Monitor
from healthwatch.store import compact_store, open_store

log = logging.getLogger("healthwatch.demo")


@dataclass
class DemoPlan:
    """Sizes of one demo."""

    total_steps: int
    onset: int
    checkpoint_every: int
    branch_steps: int
    branch_points: tuple[float, float, float] = (0.25, 0.5, 0.75)
    main_run: str = "ultra-nvfp4"


QUICK = DemoPlan(total_steps=160, onset=70, checkpoint_every=10, branch_steps=30)
FULL = DemoPlan(total_steps=400, onset=180, checkpoint_every=20, branch_steps=80)


def _alert_rules() -> Any:
    """The default rule pack when the alert engine is importable, else None."""
    try:
        from healthwatch.alerts import monitor_evaluator  # noqa: F401
    except Exception:  # noqa: BLE001 - the demo still runs without alerts
        return None
    return "default"


class _StopOnCritical:
    """``on_alert`` callback: remembers firing alerts and stops the trainer on a critical one."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.fired: list[Any] = []

    def __call__(self, transition: Any) -> None:
        if getattr(transition, "state", None) != "firing":
            return
        self.fired.append(transition)
        if getattr(transition, "severity", "") == "critical" and self.trainer is not None:
            self.trainer.stop_requested.set()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console, transient=False,
    )


def run_demo(store: Path, quick: bool = False, console: Console | None = None, plan: DemoPlan | None = None) -> dict[str, Any]:
    """Run the whole demo into ``store``; returns a summary (runs, rollback step, branch runs)."""
    console = console or Console()
    plan = plan or (QUICK if quick else FULL)
    # One intra-op thread: as fast as two at these sizes, and robust when the app shares the cores.
    torch.set_num_threads(1)
    store = Path(store)
    main = plan.main_run
    rules = _alert_rules()
    ckpt_dir = store / "checkpoints" / main
    summary: dict[str, Any] = {"store": str(store), "main": main, "branches": []}
    best = [float("inf")]

    def diverged(loss: float) -> bool:
        # Backstop only (the alerts should stop the run first): the injected divergence adds well
        # over 0.3 nat. Never before the fault's onset: single batches of a healthy run have sat
        # 0.3 nat above the best so far (seed 0, step 60 of --quick), which stopped the demo
        # before its fault and left nothing to warn about.
        best[0] = min(best[0], loss)
        return trainer.step >= plan.onset and loss > best[0] + 0.3

    base = TrainConfig(run=main, store=store, precision="nvfp4", total_steps=plan.total_steps,
                       checkpoint_every=plan.checkpoint_every, checkpoint_dir=ckpt_dir)
    with _progress(console) as progress:
        # 1. the main run, with the fault
        stopper = _StopOnCritical()
        task = progress.add_task(f"{main} (attempt 1, fault 'ultra' at step {plan.onset})",
                                 total=plan.total_steps, note="")
        mon = Monitor(store=store, run=main, precision="nvfp4", flush_every_steps=base.flush_every_steps,
                      flush_every_s=2.0, expert_load_every=10, dead_window=20, alerts=rules, on_alert=stopper,
                      config={"trainer": "healthwatch.demo", "fault": "ultra", "onset": plan.onset})
        trainer = Trainer(base, mon, make_fault("ultra", plan.onset))
        stopper.trainer = trainer

        def tick(step: int, _t: Trainer, task=task) -> None:
            progress.update(task, completed=step, note=f"{len(stopper.fired)} alerts firing")

        trainer.save_checkpoint()
        outcome = trainer.train(plan.total_steps, on_step=tick, diverged=diverged)
        stop_step = trainer.step
        mon.event("note", step=stop_step, message=f"training stopped: {outcome}")
        mon.close()
        progress.update(task, note=f"{outcome} at step {stop_step}")
        first_alert = min((int(t.step) for t in stopper.fired), default=None)
        # The last checkpoint before the first mover; without an alert, stay three checkpoints
        # clear of the step where the trainer's own divergence check tripped.
        limit = first_alert if first_alert is not None else stop_step - 3 * plan.checkpoint_every
        candidates = [s for s in trainer.checkpoints if s < limit] or [0]
        rollback = max(candidates)
        summary.update(outcome=outcome, stopped_at=stop_step, first_alert=first_alert, rollback_step=rollback,
                       alerts=[(t.alert, int(t.step)) for t in stopper.fired])
        summary.update(_lead_over_band(store, main, plan.onset, stopper.fired))

        # 2. roll back: a new attempt from the last checkpoint before the first alert, fault removed
        task2 = progress.add_task(f"{main} (attempt 2, rollback to step {rollback})",
                                  total=plan.total_steps - rollback, note="")
        mon2 = Monitor(store=store, run=main, precision="nvfp4", flush_every_steps=base.flush_every_steps,
                       flush_every_s=2.0, expert_load_every=10, dead_window=20, reason="rollback",
                       start_step=rollback, alerts=rules)
        trainer2 = Trainer(base, mon2, fault=None)
        trainer2.load_checkpoint(trainer.checkpoints[rollback])
        trainer2.checkpoints = {s: p for s, p in trainer.checkpoints.items() if s <= rollback}
        mon2.event("rollback", step=rollback,
                   message=f"rolled back from step {stop_step} ({outcome}) to checkpoint {rollback}; fault removed")
        trainer2.train(plan.total_steps,
                       on_step=lambda s, _t: progress.update(task2, completed=s - rollback))
        mon2.close()

        # 3. BF16 ablation branches from three checkpoints of the effective path
        points = sorted({min(trainer2.checkpoints, key=lambda s, f=f: abs(s - f * plan.total_steps))
                         for f in plan.branch_points})
        for bstep in points:
            name = f"{main}-bf16-s{bstep}"
            cfg = TrainConfig(run=name, store=store, precision="bf16", total_steps=plan.total_steps,
                              checkpoint_every=10**9, checkpoint_dir=store / "checkpoints" / name,
                              parent=main, branch_step=bstep)
            t3 = progress.add_task(f"{name} (BF16 branch)", total=plan.branch_steps, note="")
            bmon = Monitor(store=store, run=name, precision="bf16", parent=main, branch_step=bstep,
                           flush_every_steps=cfg.flush_every_steps, flush_every_s=2.0, expert_load_every=10,
                           dead_window=20, config={"precision": "bf16", "branched_from": main})
            branch = Trainer(cfg, bmon)
            branch.load_checkpoint(trainer2.checkpoints[bstep])
            bmon.event("note", step=bstep, message=f"branched from {main} at step {bstep} in BF16")
            branch.train(bstep + plan.branch_steps, on_step=lambda s, _t, t3=t3, b=bstep: progress.update(t3, completed=s - b))
            bmon.close()
            summary["branches"].append(name)

    with contextlib.suppress(Exception):
        compact_store(store)
    _print_summary(store, summary, console)
    return summary


def _lead_over_band(store: Path, run: str, onset: int, fired: list[Any]) -> dict[str, Any]:
    """The first firing rule and its lead over the train loss's band exit (:mod:`healthwatch.band`)
    on attempt 1 (the faulty timeline), from the loss the Monitor recorded."""
    from healthwatch.band import band_exit

    first = min(fired, key=lambda t: int(t.step), default=None)
    out: dict[str, Any] = {"first_rule": None if first is None else first.alert, "band_exit": None,
                           "band_exit_tokens": None, "lead_steps": None, "lead_tokens": None}
    try:
        st = open_store(store)
        try:
            rows = st.sql("SELECT step, tokens, value FROM scalars_all WHERE run = ? AND attempt = 1 "
                          "AND name = 'loss/train' ORDER BY step", [run]).fetchall()
        finally:
            st.close()
    except Exception as exc:  # noqa: BLE001 - the lead is a courtesy line of the summary
        log.debug("no band exit: %s", exc)
        return out
    ex = band_exit([r[0] for r in rows], [r[2] for r in rows], onset, tokens=[r[1] for r in rows]) if rows else None
    if ex is not None:
        out.update(band_exit=ex.step, band_exit_tokens=ex.tokens)
        if first is not None:
            out["lead_steps"] = ex.step - int(first.step)
            if ex.tokens is not None and first.tokens is not None:
                out["lead_tokens"] = ex.tokens - int(first.tokens)
    return out


def _lead_line(summary: dict[str, Any]) -> str:
    """``first alert X at step S; the loss left its band at step E: lead N steps (T tokens)``."""
    rule, exit_step = summary.get("first_rule"), summary.get("band_exit")
    head = f"first rule to fire: {rule} at step {summary['first_alert']}" if rule else "no rule fired"
    if exit_step is None:
        return (f"{head}; the train loss had not left its band (median of 50 steps + 4·1.4826·MAD) "
                f"by step {summary['stopped_at']}, where training stopped")
    lead = summary.get("lead_steps")
    tok = summary.get("lead_tokens")
    lead_txt = "" if lead is None else (f": lead {lead:,} steps" + ("" if tok is None else f" ({tok:,} tokens)"))
    return f"{head}; the train loss left its band at step {exit_step:,}{lead_txt}"


def _print_summary(store: Path, summary: dict[str, Any], console: Console) -> None:
    console.print(
        f"\n[bold]{summary['main']}[/]: {summary['outcome']} at step {summary['stopped_at']}; "
        + (f"first alert at step {summary['first_alert']}" if summary["first_alert"] is not None
           else "no alert fired")
        + (f"; rolled back to step {summary['rollback_step']}" if summary.get("rollback_step") is not None
           else "; no rollback"),
        soft_wrap=True,  # one line per fact (the terminal wraps it): no newline inserted mid-phrase
    )
    if summary["alerts"]:
        names = ", ".join(sorted({a for a, _ in summary["alerts"]}))
        console.print(f"alerts that fired: {names}", soft_wrap=True)
    if "first_rule" in summary:
        console.print(_lead_line(summary), soft_wrap=True)
    try:
        from healthwatch.compare import gap_summary

        st = open_store(store)
        df = gap_summary(st, summary["main"])
        if df is not None and df.height:
            from healthwatch.demo.summary import gap_table

            console.print(gap_table(df))
    except Exception as exc:  # noqa: BLE001 - the summary is a courtesy
        log.debug("no gap summary: %s", exc)
