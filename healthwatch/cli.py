"""The ``healthwatch`` command line (typer). It wires the subsystems together; nothing imports it."""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from healthwatch import __version__
from healthwatch.cli_common import StoreOpt, console, err, fail, new_app
from healthwatch.store import default_store_path

app = new_app("Training-health observability for hybrid Mamba-Transformer MoE pretraining.", name="healthwatch")

def _fail(message: str, code: int = 2) -> None:
    fail(message, code)


def _store_path(store: str | Path | None, must_exist: bool = True) -> Path:
    from healthwatch.objectstore import ObjectStoreError
    from healthwatch.store import fs as store_fs

    try:
        path = default_store_path(store)  # a directory or s3://bucket/prefix; another scheme is refused
        if must_exist and not store_fs.store_exists(path):
            _fail(f"no healthwatch store at {store_fs.root_uri(path)} (run `healthwatch demo` to create one, "
                  "or pass --store)")
    except (ValueError, ObjectStoreError) as exc:  # bad URI, missing bucket, credentials, endpoint
        _fail(str(exc))
    return path


@app.command()
def version() -> None:
    """Print the healthwatch version and schema version."""
    from healthwatch.schema import SCHEMA_VERSION

    console.print(f"healthwatch {__version__} (store schema {SCHEMA_VERSION})")


@app.command()
def runs(store: StoreOpt = None) -> None:
    """List the runs of a store with lineage, attempts, last step and tokens."""
    from healthwatch import query
    from healthwatch.store import fs as store_fs
    from healthwatch.store import open_store

    path = _store_path(store)
    try:
        st = open_store(path)
    except Exception as exc:  # noqa: BLE001 - shown to the user as one clear line
        _fail(str(exc))
    df = query.runs_overview(st)
    if df.height == 0:
        console.print("the store has no runs yet")
        return
    table = Table(title=f"runs in {store_fs.root_uri(st.root)}")
    for col in ("run", "status", "parent", "branch step", "precision", "attempts", "last step", "last tokens",
                "last write"):
        # Narrow terminals wrap cells instead of cutting numbers off; a run name stays whole.
        table.add_column(col, no_wrap=col in ("run", "status"), overflow="fold")
    for row in df.iter_rows(named=True):
        last = (
            _dt.datetime.fromtimestamp(row["last_write"]).strftime("%Y-%m-%d %H:%M:%S")
            if row["last_write"]
            else "-"
        )
        table.add_row(
            row["run"],
            row["status"] or "-",  # finished (its Monitor closed), live, idle or empty
            row["parent"] or "-",
            "-" if row["branch_step"] is None else str(row["branch_step"]),
            row["precision"] or "-",
            str(row["attempts"]),
            "-" if row["last_step"] is None else f"{row['last_step']:,}",
            "-" if row["last_tokens"] is None else f"{row['last_tokens']:,}",
            last,
        )
    console.print(table)


@app.command()
def compact(
    store: StoreOpt = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only these runs.")] = None,
    no_rollups: Annotated[bool, typer.Option("--no-rollups", help="Skip rewriting rollups.")] = False,
) -> None:
    """Merge each run's small segments into large sorted ones and rewrite the step rollups."""
    from rich.progress import Progress

    from healthwatch.store import compact_run

    path = _store_path(store)
    from healthwatch.schema import TABLES
    from healthwatch.store import fs as store_fs
    from healthwatch.store.segments import iter_run_dirs

    if store_fs.is_remote(path):  # merges under leases taken with conditional PUTs (docs/scale.md)
        from healthwatch.objectstore import ObjectStoreError
        from healthwatch.store.compact import check_s3_compaction

        try:
            check_s3_compaction(path)
        except ObjectStoreError as exc:
            _fail(f"{store_fs.root_uri(path)}: {exc}")

    found = sorted({r for t in TABLES for r, _ in iter_run_dirs(path, t)})
    targets = [r for r in found if not run or r in run]
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("compacting", total=len(targets))
        for r in targets:
            merged = compact_run(path, r, rollups=not no_rollups)
            summary = ", ".join(f"{t}: {n}→1" for t, n in merged.items()) or "nothing to merge"
            console.print(f"[bold]{r}[/]: {summary}")
            progress.advance(task)


@app.command()
def publish(
    store: StoreOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Delta tables folder (default: <store>/_delta).")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only these runs.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep publishing (a daemon) until interrupted.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between cycles with --follow.")] = 10.0,
) -> None:
    """Commit the store's sealed segments to Delta Lake tables for Spark, Trino, DuckDB (docs/scale.md)."""
    from healthwatch.publish import Publisher, PublishError, describe
    from healthwatch.store import fs as store_fs

    try:
        path = _store_path(store)
        target: object = store_fs.root_uri(path) if store_fs.is_remote(path) else path
        pub = Publisher(target, out=out, runs=run or None)  # type: ignore[arg-type]
        if not follow:
            console.print(describe(pub.publish_once()), highlight=False)
            return
        console.print(f"publishing {pub.store} to {pub.out} every {interval:g} s (Ctrl-C stops)", highlight=False)
        pub.follow(interval, on_cycle=lambda r: console.print(describe(r), highlight=False))
    except (PublishError, ImportError, OSError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return


@app.command("app")
def app_cmd(
    store: StoreOpt = None,
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to bind (default: loopback only).")] = "127.0.0.1",
) -> None:
    """Serve the Streamlit app on a store (binds 127.0.0.1 unless --host says otherwise)."""
    from healthwatch.app.launch import launch

    raise typer.Exit(launch(_store_path(store, must_exist=False), port=port, host=host))


@app.command()
def demo(
    store: StoreOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller demo (≤ 60 s).")] = False,
    no_app: Annotated[bool, typer.Option("--no-app", help="Do not start the app at the end.")] = False,
    port: Annotated[int, typer.Option(help="Port for the app.")] = 8501,
) -> None:
    """Train the reference hybrid MoE with a real injected fault, roll back, branch BF16 ablations, serve the app."""
    from healthwatch.demo.scenario import run_demo

    path = default_store_path(store)
    run_demo(path, quick=quick, console=console)
    console.print(f"\n[bold green]demo store:[/] {path.resolve()}")
    if not no_app:
        from healthwatch.app.launch import launch

        raise typer.Exit(launch(path, port=port))


# `--runs A B` (the form people type) and `--runs A --runs B` both work: click gives an option one
# value, so the values after the first arrive as extra arguments and are appended in order.
@app.command(context_settings={"allow_extra_args": True})
def compare(
    ctx: typer.Context,
    runs: Annotated[list[str], typer.Option("--runs", help="Runs to compare (--runs A B … or --runs A --runs B); the first is the low-precision run.")],
    out: Annotated[Path, typer.Option("--out", help="Output file: .csv, .parquet, .html or .png.")],
    store: StoreOpt = None,
    metric: Annotated[str, typer.Option(help="Scalar to compare.")] = "loss/train",
) -> None:
    """Token-aligned comparison of runs and their relative gap, exported to a file."""
    from healthwatch.compare import export_comparison

    try:
        path = export_comparison(_store_path(store), [*runs, *ctx.args], out, metric=metric)
    except (ValueError, LookupError) as exc:
        _fail(str(exc))
    console.print(f"wrote {path}")


import_app = typer.Typer(help="Import runs logged by other tools.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("tensorboard")
def import_tensorboard_cmd(
    logdir: Annotated[Path, typer.Argument(help="TensorBoard log directory (event files).")],
    run: Annotated[str, typer.Option("--run", help="Run name in the store.")],
    store: StoreOpt = None,
) -> None:
    """Turn Megatron-style TensorBoard event files into a healthwatch run."""
    from healthwatch.tbimport import import_tensorboard

    try:
        n = import_tensorboard(logdir, run=run, store=_store_path(store, must_exist=False))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"imported {n:,} rows into run {run}")


@import_app.command("te-debug")
def import_te_debug_cmd(
    logdir: Annotated[Path, typer.Argument(help="Transformer Engine precision-debug log directory (nvdlfw_inspect).")],
    run: Annotated[str, typer.Option("--run", help="Run name in the store (existing: rows are added to it).")],
    store: StoreOpt = None,
) -> None:
    """Add Transformer Engine precision-debug statistics (underflow %, MSE, amax per GEMM) as layer metrics."""
    from healthwatch.teimport import import_te_debug

    try:
        n = import_te_debug(logdir, run=run, store=_store_path(store, must_exist=False))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"imported {n:,} layer rows into run {run}")


@app.command()
def metrics(
    store: StoreOpt = None,
    port: Annotated[int, typer.Option(help="Port to serve /metrics on (0: any free port).")] = 9464,
    host: Annotated[str, typer.Option(help="Address to bind (default: loopback only).")] = "127.0.0.1",
    interval: Annotated[float, typer.Option(help="Seconds between reads of the store.", min=0.1)] = 5.0,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only these runs (default: all but per-rank runs).")] = None,
    once: Annotated[bool, typer.Option("--once", help="Print the exposition once and exit (no server).")] = False,
) -> None:
    """Serve the store's health signals as Prometheus metrics (per-layer aggregates, never per expert)."""
    import signal
    import threading

    from healthwatch.exporters.prometheus import MetricsServer, StoreCollector, render
    from healthwatch.exporters.source import StoreSource

    path = _store_path(store)
    if once:
        try:
            collector = StoreCollector(StoreSource(path, runs=run))
            collector.refresh()
        except Exception as exc:  # noqa: BLE001 - an unreadable store is one clear line
            _fail(f"cannot read store {path}: {exc}")
        sys.stdout.write(render(collector).decode())
        collector.source.close()
        return
    try:
        server = MetricsServer(path, host=host, port=port, interval=interval, runs=run)
        server.start()
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    err.print(f"serving {server.url} for {path} (store read every {interval:g}s); Ctrl-C stops", highlight=False)
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        server.stop()


export_app = typer.Typer(help="Mirror runs into other tools (TensorBoard event files, W&B).", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("tensorboard")
def export_tensorboard_cmd(
    run: Annotated[str, typer.Option("--run", help="Run to export.")],
    out: Annotated[Path, typer.Option("--out", help="TensorBoard log directory to write.")],
    store: StoreOpt = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep tailing the live run until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between reads with --follow.", min=0.1)] = 5.0,
) -> None:
    """Write a run's scalars and per-layer aggregates (max, median, arg-max layer) as TensorBoard events."""
    from healthwatch.exporters.tensorboard import TensorBoardExporter

    try:
        exp = TensorBoardExporter(_store_path(store), run, out)
    except (LookupError, FileNotFoundError, ImportError) as exc:
        _fail(str(exc))
    try:
        if follow:
            import signal
            import threading

            stop = threading.Event()
            handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
            err.print(f"following {run} into {out} every {interval:g}s; Ctrl-C stops", highlight=False)
            try:
                exp.follow(interval=interval, stop=stop)
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        else:
            exp.export_new()
    finally:
        exp.close()
    console.print(f"wrote {exp.written:,} values of run {run} to {out}")


@export_app.command("wandb")
def export_wandb_cmd(
    run: Annotated[str, typer.Option("--run", help="Run to export.")],
    store: StoreOpt = None,
    project: Annotated[str, typer.Option(help="W&B project.")] = "healthwatch",
    mode: Annotated[str, typer.Option(help="W&B mode: offline (sync later with `wandb sync`) or online.")] = "offline",
    out: Annotated[Path | None, typer.Option("--out", help="W&B directory (default: ./wandb).")] = None,
) -> None:
    """Log a run's scalars and per-layer aggregates to W&B, with its lineage as config (optional extra)."""
    from healthwatch.exporters.wandb import export_wandb

    if mode not in ("offline", "online"):
        _fail("--mode must be offline or online")
    try:
        n, where = export_wandb(_store_path(store), run, project=project, mode=mode, directory=out)
    except (LookupError, FileNotFoundError, ImportError) as exc:
        _fail(str(exc))
    console.print(f"logged {n:,} values of run {run} to W&B ({mode}) in {where}")


def _mount_alerts() -> None:
    try:
        from healthwatch.alerts.cli import app as alerts_app
    except ImportError as exc:  # the alerts subsystem failed to import: say so, keep the rest usable
        broken = typer.Typer(help=f"(unavailable: {exc})")
        app.add_typer(broken, name="alerts")
        return
    app.add_typer(alerts_app, name="alerts", help="Validate, test, watch and backtest alert rules.")


_mount_alerts()


def main() -> None:
    """Entry point of the ``healthwatch`` console script."""
    app()


if __name__ == "__main__":
    main()
