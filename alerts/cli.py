"""``healthwatch alerts``: check, test, watch and backtest alert rules (a typer sub-app)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from healthwatch.cli_common import StoreOpt, console, err, fail, new_app
from healthwatch.store import default_store_path
from healthwatch.store.fs import store_exists

app = new_app("Validate, test, watch and backtest alert rules.")

RulesOpt = Annotated[
    list[str] | None,
    typer.Option("--rules", "-r", help="Rule file(s); 'default' is the shipped pack (the default)."),
]


def _fail(message: str, code: int = 2) -> None:
    fail(message, code)


def _rules(rules: list[str] | None):  # noqa: ANN202 - returns a RuleSet (import kept lazy)
    from healthwatch.alerts.loader import RuleFileError, load_rules

    try:
        return load_rules(list(rules) if rules else "default")
    except RuleFileError as exc:
        _fail(str(exc))


@app.command()
def check(files: Annotated[list[Path], typer.Argument(help="Rule files to validate.")]) -> None:
    """Validate rule files; errors name the file, line and field, with the nearest valid name."""
    from healthwatch.alerts.loader import RuleFileError, load_file

    problems: list[str] = []
    for f in files:
        try:
            rs = load_file(f)
        except RuleFileError as exc:
            problems.extend(str(p) for p in exc.problems)
            continue
        groups = sorted({r.group for r in rs})
        console.print(f"[green]ok[/] {f}: {len(rs)} rules in {len(groups)} groups ({', '.join(groups)})", highlight=False)
    if problems:
        for p in problems:
            err.print(f"[red]{p}[/]", highlight=False)
        raise typer.Exit(2)


@app.command("test")
def test_cmd(files: Annotated[list[Path], typer.Argument(help="promtool-style rule test files.")]) -> None:
    """Run promtool-style rule unit tests (input series -> expected alerts) on a temporary store."""
    from healthwatch.alerts.loader import RuleFileError
    from healthwatch.alerts.promtest import run_test_file

    failed = 0
    for f in files:
        try:
            res = run_test_file(f)
        except RuleFileError as exc:
            err.print(f"[red]{exc}[/]", highlight=False)
            failed += 1
            continue
        for case in res.cases:
            if case.ok:
                console.print(f"[green]PASS[/] {f}: {case.name}", highlight=False)
            else:
                failed += 1
                console.print(f"[red]FAIL[/] {f}: {case.name}", highlight=False)
                for msg in case.failures:
                    console.print(f"       {msg}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def watch(
    store: StoreOpt = None,
    rules: RulesOpt = None,
    notify: Annotated[list[str] | None, typer.Option("--notify", "-n", help="apprise URL (slack://…, mailto://…, json://host/path); repeatable.")] = None,
    jsonl: Annotated[Path | None, typer.Option("--jsonl", help="Also append transitions to this JSON-lines file.")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only these runs (default: all).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between evaluations at most (new segments trigger one sooner).", min=0.05)] = 5.0,
    once: Annotated[bool, typer.Option("--once", help="Evaluate once and exit.")] = False,
    backfill: Annotated[str, typer.Option(help="On start, notify 'latest' (still firing), 'all' or 'none' of the transitions found in history.")] = "latest",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No console sink.")] = False,
    start: Annotated[str, typer.Option(help="'history': replay each run from its first step (exact, slow on huge runs); 'latest': start at the newest logged step, like Prometheus.")] = "history",
) -> None:
    """Alert daemon: evaluate rules on a store as it grows; record transitions; notify sinks."""
    from healthwatch.alerts.engine import Evaluator
    from healthwatch.alerts.sinks import make_sinks, redact_url

    if backfill not in ("latest", "all", "none"):
        _fail("--backfill must be latest, all or none")
    if start not in ("history", "latest"):
        _fail("--start must be history or latest")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = default_store_path(store)  # a directory or s3://bucket/prefix
    except ValueError as exc:  # an unsupported scheme, an s3:// URI without a bucket
        _fail(str(exc))
    rs = _rules(rules)
    try:
        sinks = make_sinks(notify or [], jsonl, console=not quiet, rich_console=console)
    except ValueError as exc:
        _fail(str(exc))
    ev = Evaluator(path, rs, sinks=sinks, runs=run or None, backfill=backfill,  # type: ignore[arg-type]
                   start=start)  # type: ignore[arg-type]
    targets = ", ".join(redact_url(u) for u in notify or []) or "console only"
    err.print(f"watching {path} with {len(rs)} rules every ≤{interval:g}s; notifying {targets}", highlight=False)
    try:
        if once:
            if not store_exists(path):
                _fail(f"no healthwatch store at {path}")
            ev.evaluate_once()
            _print_active(ev)
            return
        stop = threading.Event()
        # Ctrl-C / SIGTERM finish the evaluation under way, then stop. (A KeyboardInterrupt would
        # not do: DuckDB turns a SIGINT during a query into RuntimeError("Query interrupted"),
        # which the evaluator logs as a failed rule and goes on watching.)
        handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            ev.watch(interval=interval, stop=stop)
        except KeyboardInterrupt:
            stop.set()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        err.print("stopped")
    finally:
        for name, msg in sorted(ev.errors.items()):
            err.print(f"[red]rule {name} failed:[/] {msg}", highlight=False)
        ev.close()


def _print_active(ev) -> None:  # noqa: ANN001 - an Evaluator
    active = ev.active_alerts()
    if not active:
        console.print("no alerts pending or firing")
        return
    table = Table(title="pending and firing alerts")
    for col in ("alert", "severity", "state", "run", "layer", "since step"):
        table.add_column(col)
    for a in sorted(active, key=lambda a: (a["run"], a["alert"])):
        table.add_row(a["alert"], a["severity"], a["state"], a["run"],
                      "-" if a["layer"] is None else str(a["layer"]), str(a["since"]))
    console.print(table)


@app.command()
def backtest(
    run: Annotated[str, typer.Option("--run", help="Run to backtest.")],
    store: StoreOpt = None,
    rules: RulesOpt = None,
    attempt: Annotated[int | None, typer.Option(help="Backtest the path attempt N saw (e.g. the diverged one before a rollback).")] = None,
    spike_window: Annotated[int, typer.Option(help="Trailing window (steps) of the loss-spike definition.", min=2)] = 50,
    spike_k: Annotated[float, typer.Option(help="Robust sigmas above the trailing median that make a loss spike.", min=0.1)] = 6.0,
) -> None:
    """When would each rule have fired on a run, and how many steps before the loss spike?"""
    from healthwatch.alerts.backtest import backtest as run_backtest
    from healthwatch.alerts.backtest import render_backtest

    path = default_store_path(store)
    if not store_exists(path):  # a directory, or an s3:// store
        _fail(f"no healthwatch store at {path}")
    rs = _rules(rules)
    try:
        res = run_backtest(path, run, rs, attempt=attempt, spike_window=spike_window, spike_k=spike_k)
    except (LookupError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    render_backtest(res, console)


@app.command()
def packs() -> None:
    """List the rule packs shipped with healthwatch and where they are."""
    from healthwatch.alerts.loader import load_pack, pack_names, pack_path

    for name in pack_names():
        console.print(f"[bold]{name}[/]: {len(load_pack(name))} rules, {pack_path(name)}", highlight=False)
