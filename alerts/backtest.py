"""Backtests: when would each rule have fired on a recorded run, and how long before the loss spike?

The *loss spike* is the first step where ``loss/train`` rises above its trailing median by more
than ``k`` robust standard deviations (``1.4826·MAD``) and at least ``min_rel`` of the median, or
becomes non-finite; it is computed by the same ``spike`` detector the rules use, so "lead" is
measured against a definition that does not move with the rule being judged.

``attempt=N`` backtests the path attempt *N* saw (the effective views hide a diverged attempt
after a rollback; that path is usually the one worth backtesting).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from healthwatch.alerts.detectors import NEVER, Sources, evaluate
from healthwatch.alerts.engine import Evaluator
from healthwatch.alerts.loader import load_rules
from healthwatch.alerts.rules import Expr
from healthwatch.alerts.transition import Transition
from healthwatch.store import Store


@dataclass(frozen=True)
class LossSpike:
    """The first loss spike of a run: its step, tokens, loss value and why it counts."""

    step: int
    tokens: int | None
    value: float | None
    reason: str


@dataclass
class RuleResult:
    """One rule's backtest: first firing step/tokens, number of firings, lead before the spike."""

    group: str
    alert: str
    severity: str
    first_step: int | None = None
    first_tokens: int | None = None
    first_layer: int | None = None
    firings: int = 0
    lead_steps: int | None = None
    lead_tokens: int | None = None


@dataclass
class BacktestResult:
    """A whole backtest: the run, its loss spike (or None) and a result per rule."""

    run: str
    attempt: int | None
    spike: LossSpike | None
    rules: list[RuleResult] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def find_loss_spike(
    store: Store,
    run: str,
    *,
    metric: str = "loss/train",
    window: int = 50,
    k: float = 6.0,
    min_rel: float = 0.02,
    sources: Sources | None = None,
) -> LossSpike | None:
    """First step where ``metric`` spikes (trailing median + k·1.4826·MAD, ≥ ``min_rel``) or is non-finite."""
    spike = Expr.model_validate({"spike": {"metric": metric, "window": window, "k": k, "min_rel": min_rel,
                                           "min_points": max(2, window // 2)}})
    nonfinite = Expr.model_validate({"nonfinite": {"metrics": [metric]}})
    found: list[LossSpike] = []
    df = evaluate(store, spike, {run: NEVER}, sources)
    hit = df.filter(df["active"]).head(1)
    if hit.height:
        r = hit.row(0, named=True)
        found.append(LossSpike(int(r["step"]), r["tokens"], r["value"],
                               f"loss above trailing median + {k:g}·1.4826·MAD ({r['detail']})"))
    df = evaluate(store, nonfinite, {run: NEVER}, sources)
    hit = df.filter(df["active"]).head(1)
    if hit.height:
        r = hit.row(0, named=True)
        found.append(LossSpike(int(r["step"]), r["tokens"], math.nan, f"non-finite loss ({r['detail']})"))
    return min(found, key=lambda s: s.step) if found else None


def backtest(
    store_root: str | os.PathLike[str],
    run: str,
    rules: Any = "default",
    *,
    attempt: int | None = None,
    spike_window: int = 50,
    spike_k: float = 6.0,
    spike_min_rel: float = 0.02,
) -> BacktestResult:
    """Evaluate ``rules`` over the whole history of ``run`` without recording or notifying."""
    ruleset = load_rules(rules)
    sources = Sources.attempt_path(attempt) if attempt is not None else None
    ev = Evaluator(store_root, ruleset, runs=[run], record=False, sources=sources, evaluator_id="backtest")
    try:
        store = ev.store
        if store is None:
            raise FileNotFoundError(f"no healthwatch store at {store_root}")
        known = {r[0] for r in store.sql(
            "SELECT DISTINCT run FROM scalars UNION SELECT DISTINCT run FROM layer_stats").fetchall()}
        if run not in known:
            from healthwatch.alerts.rules import suggest

            raise LookupError(f"run {run!r} has no scalars or layer stats in {store_root}{suggest(run, known)}")
        transitions = ev.evaluate_once()
        spike = find_loss_spike(store, run, window=spike_window, k=spike_k, min_rel=spike_min_rel, sources=sources)
        errors = dict(ev.errors)
    finally:
        ev.close()
    results: list[RuleResult] = []
    for lr in ruleset:
        rr = RuleResult(lr.group, lr.rule.alert, lr.rule.severity)
        fired = [t for t in transitions if t.group == lr.group and t.alert == lr.rule.alert and t.state == "firing"]
        rr.firings = len(fired)
        if fired:
            first = min(fired, key=lambda t: t.step)
            rr.first_step, rr.first_tokens, rr.first_layer = first.step, first.tokens, first.layer
            if spike is not None:
                rr.lead_steps = spike.step - first.step
                if spike.tokens is not None and first.tokens is not None:
                    rr.lead_tokens = spike.tokens - first.tokens
        results.append(rr)
    return BacktestResult(run, attempt, spike, results, transitions, errors)


def render_backtest(result: BacktestResult, console: Console | None = None) -> None:
    """Print a backtest as a rich table (rules that fired first, in firing order)."""
    console = console or Console()
    path = f" (path of attempt {result.attempt})" if result.attempt is not None else ""
    if result.spike is None:
        console.print(f"[bold]{result.run}[/]{path}: no loss spike found")
    else:
        s = result.spike
        tok = "-" if s.tokens is None else f"{s.tokens:,}"
        console.print(f"[bold]{result.run}[/]{path}: loss spike at step [bold]{s.step:,}[/] (tokens {tok}): {s.reason}")
    table = Table(title=f"backtest of {result.run}")
    for col in ("rule", "severity", "first firing step", "tokens", "layer", "firings", "lead (steps)", "lead (tokens)"):
        table.add_column(col, justify="right" if col not in ("rule", "severity") else "left")
    order = sorted(result.rules, key=lambda r: (r.first_step is None, r.first_step or 0, r.group, r.alert))
    for r in order:
        lead = "-" if r.lead_steps is None else (f"[green]{r.lead_steps:,}[/]" if r.lead_steps > 0 else f"[red]{r.lead_steps:,}[/]")
        table.add_row(
            f"{r.group}/{r.alert}", r.severity,
            "-" if r.first_step is None else f"{r.first_step:,}",
            "-" if r.first_tokens is None else f"{r.first_tokens:,}",
            "-" if r.first_layer is None else str(r.first_layer),
            str(r.firings), lead, "-" if r.lead_tokens is None else f"{r.lead_tokens:,}",
        )
    console.print(table)
    for name, err in sorted(result.errors.items()):
        console.print(f"[red]rule {name} failed:[/] {err}")
