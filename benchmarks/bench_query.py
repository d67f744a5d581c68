"""Benchmark 4: queries at scale on a LIVE store, written through the Monitor's writer path.

The store is written the way a live Monitor's writer thread writes it, and never compacted by
hand: one run of ``steps`` steps x 108 layers x 3 layer metrics (``resid_rms``, ``resid_rms_max``,
``wgrad_norm``; 3.24 x 10^8 rows at 1M steps) plus 3 loss scalars per step, published one flush
(100 steps) at a time with :meth:`StoreWriter.write` (which keeps the 100/1,000/10,000-step
rollups current) followed by :meth:`StoreWriter.compact_own` (the writer's self-merge) — the calls
``healthwatch.hooks.writer.MonitorWriter`` makes per flush. That write is timed as its own
ingest row (rows per CPU-second, live merging and rollups on). A BF16 branch run (``parent`` =
the first, from the middle, for a tenth of the steps, tokens offset by a third of a step) makes
comparisons need the token-aligned ASOF join.

Timed with healthwatch's named queries (``healthwatch.query``, the app's own reader): one
downsampled series (≤ 2,000 points, p50/p95 over ≥ 20 calls on random layers), a layer x step
heatmap (400 buckets), the token-aligned relative gap, one incremental alert evaluation after a
new flush lands, and a fresh Python process opening the store and reading one 2,000-step series
(interpreter start and imports reported separately). Every benchmarked query is checked against
a raw-SQL reference over the ``*_effective`` views in the same run: a fast wrong answer fails.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    NA,
    Budget,
    Job,
    Section,
    Table,
    child_main,
    dir_bytes,
    emit_progress,
    fmt_bytes,
    fmt_time,
    median,
    percentile,
    verdict,
)

RUN, REF_RUN = "bench-nvfp4", "bench-bf16"
METRICS = ("resid_rms", "resid_rms_max", "wgrad_norm")
SCALARS = ("loss/train", "loss/mtp_1", "loss/mtp_2")
LAYER_TYPES = ("mamba", "moe", "mamba", "moe", "attention", "moe")  # 108 layers: 54 MoE
TOKENS_PER_STEP = 1 << 20
FLUSH_STEPS, FANOUT = 100, 16  # FANOUT: StoreWriter's default merge fan-out
ROW_GROUP = 122_880
SERIES_BUDGET_S, HEATMAP_BUDGET_S, ALERT_BUDGET_S = 0.100, 0.250, 5.0
#: Bytes per layer_stats row on disk (zstd Parquet, random float64 values), measured.
BYTES_PER_ROW = 15.0


# --------------------------------------------------------------------------------------------
# synthetic store


def _layer_values(metric: int, layer: int, steps: Any, rng: Any) -> Any:
    import numpy as np

    base = (1.0 + 0.02 * layer, 3.0 + 0.05 * layer, 0.5 / (1.0 + layer / 20.0))[metric]
    v = base * (1.0 + 0.05 * np.sin(steps / 25_000.0 + layer)) * (1.0 + 0.01 * rng.standard_normal(steps.shape[0]))
    v[steps % 99_991 == 77] *= 6.0  # rare spikes that downsampling must keep
    return v


def _loss(steps: Any, rng: Any) -> Any:

    return 2.0 + 8.0 / (1.0 + steps / 5_000.0) + 0.01 * rng.standard_normal(steps.shape[0])


def _flush_tables(a: int, b: int, layers: int, seed: int) -> tuple[Any, Any]:
    """One flush of steps ``[a, b)`` as the Monitor's row builder emits it (step-major)."""
    import numpy as np
    import pyarrow as pa

    from healthwatch.schema import TABLES

    rng = np.random.default_rng((seed, a))
    steps = np.arange(a, b, dtype=np.int64)
    n = b - a
    per_step = len(METRICS) * layers
    vals = np.empty((n, len(METRICS), layers))
    for m in range(len(METRICS)):
        for layer in range(layers):
            vals[:, m, layer] = _layer_values(m, layer, steps, rng)
    layer_idx = np.tile(np.arange(layers, dtype=np.int32), n * len(METRICS))
    # Strings dictionary-encoded, as healthwatch.hooks.rows.RowBuilder hands them to the writer.
    ls = pa.Table.from_arrays([
        pa.array(np.ones(n * per_step, dtype=np.int32)), pa.array(np.repeat(steps, per_step)),
        pa.array(np.repeat((steps + 1) * TOKENS_PER_STEP, per_step)), pa.array(layer_idx),
        pa.DictionaryArray.from_arrays(pa.array(layer_idx % len(LAYER_TYPES)), pa.array(LAYER_TYPES, pa.string())),
        pa.DictionaryArray.from_arrays(pa.array(np.tile(np.repeat(np.arange(len(METRICS), dtype=np.int32), layers), n)),
                                       pa.array(METRICS, pa.string())),
        pa.array(vals.reshape(-1)),
    ], names=TABLES["layer_stats"].names)
    loss = _loss(steps, rng)
    sc = pa.Table.from_pydict({
        "attempt": np.ones(n * len(SCALARS), dtype=np.int32), "step": np.tile(steps, len(SCALARS)),
        "tokens": np.tile((steps + 1) * TOKENS_PER_STEP, len(SCALARS)),
        "name": [k for k in SCALARS for _ in range(n)],
        "value": np.concatenate([loss * (1.0 + 0.05 * k) for k in range(len(SCALARS))]),
        "wall_time": np.tile(1.7e9 + steps.astype(np.float64), len(SCALARS)),
    }, schema=TABLES["scalars"])
    return ls, sc


def generate_store(root: Path, steps: int, layers: int = 108, seed: int = 0,
                   progress: Any = None) -> dict[str, Any]:
    """Write the live store through the writer path (see the module docstring); returns sizes and
    the ingest time (wall and CPU of the write + self-merge + rollup calls only, not data generation)."""
    from healthwatch.store import StoreWriter, attempt_row, init_store, run_row

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    init_store(root)
    ref_first = steps // 2
    ref_steps = max(1_000, steps // 10)
    writers = {}
    for run, parent, branch, precision in ((RUN, None, None, "nvfp4"), (REF_RUN, RUN, ref_first, "bf16")):
        w = StoreWriter(root, run, merge_fanout=FANOUT)
        w.write("runs", run_row(parent=parent, branch_step=branch, precision=precision))
        w.write("attempts", attempt_row(attempt=1, start_step=0 if parent is None else branch, host="bench"))
        writers[run] = w
    w = writers[RUN]
    rows, ingest_wall, ingest_cpu, flushes = 0, 0.0, 0.0, 0
    for a in range(0, steps, FLUSH_STEPS):
        b = min(steps, a + FLUSH_STEPS)
        ls, sc = _flush_tables(a, b, layers, seed)
        w0, c0 = time.perf_counter(), time.process_time()
        w.write("layer_stats", ls)
        w.write("scalars", sc)
        w.compact_own("layer_stats")
        w.compact_own("scalars")
        ingest_wall += time.perf_counter() - w0
        ingest_cpu += time.process_time() - c0
        rows += ls.num_rows + sc.num_rows
        flushes += 1
        if progress is not None:
            progress(b, steps)
    # The branch run: its own writer, its scalars only (tokens offset by a third of a step).
    ref = writers[REF_RUN]
    for a in range(ref_first, ref_first + ref_steps, FLUSH_STEPS):
        _ls, sc = _flush_tables(a, min(ref_first + ref_steps, a + FLUSH_STEPS), 1, seed + 1)
        import pyarrow.compute as pc

        sc = sc.set_column(sc.schema.get_field_index("tokens"), "tokens",
                           pc.add(sc["tokens"], TOKENS_PER_STEP // 3))
        sc = sc.set_column(sc.schema.get_field_index("value"), "value", pc.multiply(sc["value"], 0.997))
        ref.write("scalars", sc)
        ref.compact_own("scalars")
        rows += sc.num_rows
    files = sum(1 for _ in (root / "table=layer_stats" / f"run={RUN}").glob("*.parquet"))
    return {"steps": steps, "layers": layers, "rows": rows, "layer_rows": steps * layers * len(METRICS),
            "segments": files, "flushes": flushes, "ref_steps": ref_steps, "bytes": dir_bytes(root),
            "gen_s": time.perf_counter() - t0, "ingest_wall_s": ingest_wall, "ingest_cpu_s": ingest_cpu,
            "ingest_rows": steps * (layers * len(METRICS) + len(SCALARS))}


# --------------------------------------------------------------------------------------------
# queries


def _gap(store: Any, root: Path) -> tuple[str, Any]:
    """Time source for the token-aligned gap: healthwatch.compare if present, else the query it stands for."""
    try:
        from healthwatch.compare import relative_gap  # type: ignore[import-not-found]
    except ImportError:
        relative_gap = None
    if relative_gap is not None:
        return "healthwatch.compare.relative_gap", lambda: relative_gap(store, RUN, REF_RUN, metric="loss/train")
    sql = """
        WITH lo AS (SELECT step, tokens, value FROM scalars_effective WHERE run = ? AND name = 'loss/train'),
             ref AS (SELECT tokens, value FROM scalars_effective WHERE run = ? AND name = 'loss/train')
        SELECT lo.step, lo.tokens, (lo.value - ref.value) / ref.value AS gap
        FROM lo ASOF JOIN ref ON lo.tokens >= ref.tokens
        WHERE lo.tokens <= (SELECT max(tokens) FROM ref) ORDER BY lo.tokens
    """
    return ("ASOF-join SQL stand-in (healthwatch.compare not importable)",
            lambda: store.sql(sql, [RUN, REF_RUN]).pl())


def _append_flush(root: Path, first_step: int, layers: int) -> int:
    """Publish one new flush (100 steps) of the main run, as a live Monitor would."""
    import numpy as np

    from healthwatch.store import StoreWriter

    w = StoreWriter(root, RUN, attempt=1, rank=0)
    steps = np.arange(first_step, first_step + FLUSH_STEPS, dtype=np.int64)
    rng = np.random.default_rng(first_step)
    per = len(METRICS) * layers
    layer_idx = np.tile(np.arange(layers, dtype=np.int32), FLUSH_STEPS * len(METRICS))
    w.write("layer_stats", {
        "attempt": [1] * (FLUSH_STEPS * per), "step": np.repeat(steps, per).tolist(),
        "tokens": np.repeat((steps + 1) * TOKENS_PER_STEP, per).tolist(), "layer": layer_idx.tolist(),
        "layer_type": [LAYER_TYPES[i % len(LAYER_TYPES)] for i in layer_idx],
        "metric": [METRICS[k] for k in np.tile(np.repeat(np.arange(len(METRICS)), layers), FLUSH_STEPS)],
        "value": rng.lognormal(0, 0.1, FLUSH_STEPS * per).tolist(),
    })
    loss = _loss(steps, rng)
    w.write("scalars", {
        "attempt": [1] * (3 * FLUSH_STEPS), "step": np.tile(steps, 3).tolist(),
        "tokens": np.tile((steps + 1) * TOKENS_PER_STEP, 3).tolist(),
        "name": [n for n in SCALARS for _ in range(FLUSH_STEPS)],
        "value": np.concatenate([loss, loss * 1.05, loss * 1.1]).tolist(),
        "wall_time": [time.time()] * (3 * FLUSH_STEPS),
    })
    return FLUSH_STEPS * (per + 3)


#: Above this many steps the alert benchmark starts its evaluator at the newest step (see _alert_eval).
ALERT_HISTORY_MAX_STEPS = 100_000


def _alert_eval(root: Path, steps: int, layers: int, rounds: int = 2) -> dict[str, Any]:
    """Incremental evaluations of the default rule pack after new flushes, two evaluators side by side.

    ``new``: the engine as it is. ``store_sql``: the same engine with every ``sql`` rule run on the
    store (how the engine evaluated them before they moved to the snapshot; the regression of
    2026-12-03). Both start at the newest step and evaluate the same flushes (rounds alternate
    which goes first); their cursors and pending/firing instances must agree, so a fast wrong
    answer fails.
    """
    try:
        from healthwatch.alerts import detectors  # type: ignore[import-not-found]
        from healthwatch.alerts.engine import Evaluator  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"skipped": f"healthwatch.alerts.engine not importable ({exc})"}

    def on_store(ev: Any) -> Any:
        """``ev.evaluate_once`` with every sql rule sent to the store (the engine before the fix)."""
        def run() -> Any:
            saved = detectors.sql_on_snapshot
            detectors.sql_on_snapshot = lambda query: False  # type: ignore[assignment]
            try:
                return ev.evaluate_once()
            finally:
                detectors.sql_on_snapshot = saved
        return run

    try:
        # A first evaluation replays the whole history (~0.5M rows/s here: minutes at 1M steps x
        # 108 layers); a daemon started on a store that large starts at the newest step instead.
        start = "latest" if steps > ALERT_HISTORY_MAX_STEPS else "history"
        evs = {"new": Evaluator(root, "default", runs=[RUN, REF_RUN], start=start),
               "store_sql": Evaluator(root, "default", runs=[RUN, REF_RUN], start=start, record=False)}
        calls = {"new": evs["new"].evaluate_once, "store_sql": on_store(evs["store_sql"])}
        out: dict[str, Any] = {"start": start, "rounds": rounds, "appended_rows": 0,
                               "sql_rules": [r.name for r in evs["new"].rules if detectors._sql_queries(r.rule.expr)]}
        for name in ("new", "store_sql"):
            t0 = time.perf_counter()
            calls[name]()
            out[f"backfill_{name}_s"] = time.perf_counter() - t0
        times: dict[str, list[float]] = {"new": [], "store_sql": []}
        same = True
        first = steps
        for k in range(rounds):
            out["appended_rows"] += _append_flush(root, first, layers)
            first += FLUSH_STEPS
            seen: dict[str, Any] = {}
            for name in (("new", "store_sql") if k % 2 == 0 else ("store_sql", "new")):
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
                ev = evs[name]
                seen[name] = (sorted((a["alert"], a["run"], a["layer"] if a["layer"] is not None else -1, a["state"],
                                      a["since"]) for a in ev.active_alerts()),
                              {(r.name, run): ev.cursor(r.name, run) for r in ev.rules for run in (RUN, REF_RUN)})
            same = same and seen["new"] == seen["store_sql"]
        for ev in evs.values():
            ev.close()
    except Exception as exc:  # noqa: BLE001 - an evaluator in progress must not sink the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}
    out.update({"incremental_s": median(times["new"]), "incremental_runs_s": times["new"],
                "incremental_store_sql_s": times["store_sql"], "backfill_s": out["backfill_new_s"], "same": same})
    return out


def run_generate(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: generate the synthetic store (``layout``: ``writer``, or ``direct`` — the same files
    built without running the flushes, see :mod:`benchmarks.live_layout`)."""
    root = Path(params["workdir"]) / "query-store"
    if params.get("layout") == "direct":
        from benchmarks.live_layout import generate

        return generate(root, int(params["steps"]), int(params.get("layers", 108)), int(params.get("seed", 0)),
                        progress=lambda d, t: emit_progress(d, t, "writing the layout"))
    return generate_store(root, int(params["steps"]), int(params.get("layers", 108)), int(params.get("seed", 0)),
                          progress=lambda d, t: emit_progress(d, t, "generating"))


_FRESH = r"""
import json, sys, time
t0 = time.perf_counter()
from healthwatch import query
from healthwatch.store import open_store
t1, c1 = time.perf_counter(), time.process_time()
store = open_store(sys.argv[1])
df = query.series(store, sys.argv[2], "resid_rms", layer=int(sys.argv[3]), step_min=int(sys.argv[4]),
                  step_max=int(sys.argv[4]) + 1999, max_points=2000)
t2, c2 = time.perf_counter(), time.process_time()
ref = store.sql("SELECT step, value FROM layer_stats_effective WHERE run = ? AND metric = 'resid_rms' AND layer = ? "
                "AND step BETWEEN ? AND ? ORDER BY step",
                [sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[4]) + 1999]).fetchall()
ok = [(int(a), float(b)) for a, b in zip(df["step"], df["value"])] == [(int(a), float(b)) for a, b in ref]
print(json.dumps({"import_s": t1 - t0, "open_read_s": t2 - t1, "open_read_cpu_s": c2 - c1, "rows": df.height, "ok": ok}))
"""


def _fresh_process(root: Path, steps: int, layers: int, rng: random.Random, n: int = 5) -> dict[str, Any]:
    """A new interpreter opens the store and reads one 2,000-step series (checked against raw SQL)."""
    import json
    import subprocess
    import sys

    starts, imports, reads, cpus, ok = [], [], [], [], True
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        starts.append(time.perf_counter() - t0)
        first = rng.randrange(max(1, steps - 2000))
        out = subprocess.run([sys.executable, "-c", _FRESH, str(root), RUN, str(rng.randrange(layers)), str(first)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        imports.append(r["import_s"])
        reads.append(r["open_read_s"])
        cpus.append(r["open_read_cpu_s"])  # this process's CPU (all its threads) in open + read
        ok = ok and bool(r["ok"]) and r["rows"] == min(2000, steps)
    return {"interpreter_s": starts, "import_s": imports, "open_read_s": reads, "open_read_cpu_s": cpus, "ok": ok}


def _check_series(store: Any, df: Any, table: str, key: str, params: list[Any]) -> bool:
    """A downsampled series keeps the exact minimum and maximum of the raw effective rows."""
    row = store.sql(f"SELECT min(value), max(value), count(*) FROM {table}_effective WHERE run = ? AND {key}",
                    params).fetchone()
    return df.height <= 2000 and df.height > 0 and (df["value"].min(), df["value"].max()) == (row[0], row[1])


def _check_heatmap(store: Any, hm: Any, metric: str, max_buckets: int) -> bool:
    """The heatmap equals a raw-SQL aggregation of the effective rows, cell by cell."""
    from healthwatch import query

    lo, hi = store.sql("SELECT min(step), max(step) FROM layer_stats_effective WHERE run = ? AND metric = ?",
                       [RUN, metric]).fetchone()
    w = query.display_width(lo, hi, max_buckets)
    ref = store.sql(f"SELECT layer, (step // {w}) * {w} AS step, avg(value) AS value FROM layer_stats_effective "
                    "WHERE run = ? AND metric = ? GROUP BY ALL", [RUN, metric]).fetchall()
    got = {(int(r[0]), int(r[1])): r[2] for r in hm.select("layer", "step", "value").iter_rows()}
    want = {(int(r[0]), int(r[1])): r[2] for r in ref}
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-9 * max(1.0, abs(want[k])) for k in want)


def run_queries(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: time the named queries on the live store, each checked against raw SQL."""
    import healthwatch as hw
    from healthwatch import query

    root = Path(params["workdir"]) / "query-store"
    steps, layers = int(params["steps"]), int(params.get("layers", 108))
    repeats, heat_repeats = int(params.get("repeats", 20)), int(params.get("heat_repeats", 5))
    rng = random.Random(int(params.get("seed", 0)))
    total = 1 + repeats + 5 + 1 + heat_repeats + 3 + 2 + 1
    done = 0
    checks: dict[str, bool] = {}

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        emit_progress(done, total, label)

    t0 = time.perf_counter()
    store = hw.open_store(root)
    open_s = time.perf_counter() - t0
    out: dict[str, Any] = {"phase": params["phase"], "open_s": open_s,
                           "files": len(store.files("layer_stats", RUN)),
                           "rollup_files": len(store.files("layer_stats_rollup", RUN)), "bytes": dir_bytes(root)}
    # one downsampled layer series
    layer = rng.randrange(layers)
    t0 = time.perf_counter()
    df = query.series(store, RUN, "resid_rms", layer=layer, max_points=2000)
    out["series_cold_s"] = time.perf_counter() - t0
    checks["series"] = _check_series(store, df, "layer_stats", "metric = 'resid_rms' AND layer = ?", [RUN, layer])
    tick("series")
    times, points = [], []
    for _ in range(repeats):
        layer = rng.randrange(layers)
        t0 = time.perf_counter()
        df = query.series(store, RUN, "resid_rms", layer=layer, max_points=2000)
        times.append(time.perf_counter() - t0)
        points.append(df.height)
        tick("series")
    checks["series"] = checks["series"] and _check_series(
        store, df, "layer_stats", "metric = 'resid_rms' AND layer = ?", [RUN, layer])
    out["series_s"], out["series_points"] = times, points
    # one downsampled scalar series (loss)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        df = query.series(store, RUN, "loss/train", max_points=2000)
        times.append(time.perf_counter() - t0)
        tick("loss series")
    checks["loss series"] = _check_series(store, df, "scalars", "name = 'loss/train'", [RUN])
    out["loss_series_s"], out["loss_series_points"] = times, df.height
    # heatmap
    t0 = time.perf_counter()
    hm = query.heatmap(store, RUN, "resid_rms", max_buckets=400)
    out["heatmap_cold_s"] = time.perf_counter() - t0
    tick("heatmap")
    times = []
    for _ in range(heat_repeats):
        t0 = time.perf_counter()
        hm = query.heatmap(store, RUN, "resid_rms", max_buckets=400)
        times.append(time.perf_counter() - t0)
        tick("heatmap")
    checks["heatmap"] = _check_heatmap(store, hm, "resid_rms", 400)
    out["heatmap_s"], out["heatmap_cells"], out["heatmap_layers"] = times, hm.height, hm["layer"].n_unique()
    # token-aligned gap
    label, fn = _gap(store, root)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gap = fn()
        times.append(time.perf_counter() - t0)
        tick("gap")
    out["gap_s"], out["gap_source"] = times, label
    out["gap_rows"] = getattr(gap, "height", None)
    store.close()
    # a fresh process: open + one 2,000-step series
    out["fresh"] = _fresh_process(root, steps, layers, rng)
    checks["fresh-process series"] = out["fresh"]["ok"]
    tick("fresh process")
    # one incremental alert evaluation (appends a flush: keep it last)
    out["alerts"] = _alert_eval(root, steps, layers)
    if "same" in out["alerts"]:
        checks["alert evaluation"] = out["alerts"]["same"]
    tick("alerts")
    tick("done")
    out["checks"] = checks
    return out


TASKS = {"generate": run_generate, "queries": run_queries}


def disk_needed(steps: int, layers: int = 108) -> int:
    """Bytes the query benchmark needs at ``steps`` (live store + compacted copy + DuckDB spill)."""
    return int(steps * layers * len(METRICS) * BYTES_PER_ROW * 3.5) + (1 << 30)


def fit_steps(steps: int, workdir: Path, layers: int = 108) -> tuple[int, str]:
    """Largest size ≤ ``steps`` whose files fit on the disk of ``workdir`` (halving); and why it shrank."""
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    n = steps
    while n > 10_000 and disk_needed(n, layers) > free:
        n //= 2
    note = "" if n == steps else (f"reduced from {steps:,} to {n:,} steps: {free / 2**30:.1f} GiB free under "
                                  f"{workdir}, {disk_needed(steps, layers) / 2**30:.1f} GiB needed")
    return n, note


def jobs(quick: bool, workdir: Path, steps: int | None = None) -> list[Job]:
    """Generate the live store through the writer path, then query it (each a child task)."""
    n = steps if steps is not None else (10_000 if quick else 1_000_000)
    # HEALTHWATCH_BENCH_LAYOUT=direct builds the writer's self-merged layout without running the
    # 10,000 flushes (hours on a shared 2-core machine at 1M steps); no ingest row then.
    base = {"workdir": str(workdir), "steps": n, "layers": 108, "seed": 0,
            "layout": os.environ.get("HEALTHWATCH_BENCH_LAYOUT", "writer")}
    q = dict(base, repeats=20, heat_repeats=3 if quick else 5)
    scale = max(1.0, n / 100_000)
    return [
        Job("query:generate", "benchmarks.bench_query", "generate", base,
            f"query: write {n:,} steps through the writer path", timeout_s=300 + 400 * scale),
        Job("query:live", "benchmarks.bench_query", "queries", dict(q, phase="live"),
            "query: live store (never compacted)", timeout_s=300 + 200 * scale),
    ]


INGEST_BUDGET_ROWS_PER_CPU_S = 2_000_000
FRESH_BUDGET_S = 0.020


def section(results: dict[str, dict[str, Any]], size_note: str = "") -> Section:
    """Budget rows and tables from the live-store phase."""
    sec = Section("query", "4. Queries at scale (live store, never compacted by hand)")
    gen = results.get("query:generate")
    if gen is None or "error" in gen:
        sec.errors.append((gen or {}).get("error", "did not run"))
        sec.budgets.append(Budget("chart query, one series", "p95 ≤ 100 ms", "error", NA))
        sec.budgets.append(Budget("layer × step heatmap", "≤ 250 ms", "error", NA))
        return sec
    sec.intro = (
        f"Live store: run `{RUN}` with {gen['steps']:,} steps × {gen['layers']} layers × {len(METRICS)} "
        f"metrics = {gen['layer_rows']:,} `layer_stats` rows (+ {len(SCALARS)} loss scalars per step), written "
        f"in {gen['flushes']:,} flushes of {FLUSH_STEPS} steps through `StoreWriter.write` (live rollups) + "
        f"`compact_own` (self-merge), never compacted by hand; a BF16 branch `{REF_RUN}` of {gen['ref_steps']:,} "
        f"steps; {fmt_bytes(gen['bytes'])} of Parquet, {gen['segments']} `layer_stats` segments."
        + (f" **Size {size_note}.**" if size_note else "")
    )
    if gen.get("layout") == "direct":
        sec.intro = sec.intro.replace(
            "written in", "laid out as the writer leaves it after").replace(
            "never compacted by hand;", "never compacted by hand (built by `benchmarks/live_layout.py`: the same "
            "self-merged files — " + ", ".join(f"{lv_n} × L{lv}" for lv, lv_n in sorted(
                {lv: gen.get("levels", []).count(lv) for lv in set(gen.get("levels", []))}.items(), reverse=True))
            + " — and rollups, without running the flushes; no ingest row from this store);")
    else:
        rate = gen["ingest_rows"] / gen["ingest_cpu_s"] if gen.get("ingest_cpu_s") else 0.0
        sec.budgets.append(Budget(
            "ingest with live merging and rollups (rows per CPU-second of the writer calls)", "≥ 2 M rows/CPU-s",
            f"{rate / 1e6:.2f} M rows/CPU-s", verdict(rate >= INGEST_BUDGET_ROWS_PER_CPU_S),
            f"{gen['ingest_rows']:,} rows in {fmt_time(gen['ingest_cpu_s'])} CPU ({fmt_time(gen['ingest_wall_s'])} wall)"))
    p = results.get("query:live")
    if p is None or "error" in p:
        sec.errors.append((p or {}).get("error", "queries did not run"))
        return sec
    checks = p.get("checks", {})
    bad = [k for k, v in checks.items() if not v]
    if bad:
        sec.errors.append("answers differ from the raw-SQL reference: " + ", ".join(bad))

    def checked(name: str) -> str:
        return "matches raw SQL" if checks.get(name) else ("WRONG vs raw SQL" if name in checks else "not checked")

    fr = p.get("fresh", {})
    rows = [
        ["store files (layer_stats / its rollups, this run)", f"{p['files']} / {p.get('rollup_files', '?')}", ""],
        ["open store (lazy: lists nothing until a query)", fmt_time(p["open_s"]), ""],
        ["one layer series ≤ 2,000 pts: p50", fmt_time(median(p["series_s"])), checked("series")],
        ["one layer series: p95", fmt_time(percentile(p["series_s"], 95)), ""],
        ["one layer series: first call", fmt_time(p["series_cold_s"]), ""],
        ["loss series (scalar) p50", fmt_time(median(p["loss_series_s"])), checked("loss series")],
        ["heatmap 108 layers × 400 buckets: p50", fmt_time(median(p["heatmap_s"])), checked("heatmap")],
        ["heatmap: first call", fmt_time(p["heatmap_cold_s"]), ""],
        ["token-aligned gap between the runs: p50", fmt_time(median(p["gap_s"])), f"{p.get('gap_rows')} rows"],
    ]
    if fr.get("open_read_s"):
        rows += [
            ["fresh process: open + one 2,000-step series (median)", fmt_time(median(fr["open_read_s"])),
             checked("fresh-process series")],
            ["fresh process: imports (healthwatch.query + store)", fmt_time(median(fr["import_s"])), ""],
            ["fresh process: interpreter start (`python -c pass`)", fmt_time(median(fr["interpreter_s"])), ""],
        ]
    a = p.get("alerts", {})
    if "incremental_s" in a:
        rows.append(["one incremental alert evaluation after a flush (median)", fmt_time(a["incremental_s"]),
                     f"first: {fmt_time(a['backfill_s'])} ({a.get('start')})"])
    if a.get("incremental_store_sql_s"):
        rows.append([f"the same with the {len(a.get('sql_rules', []))} sql rules on the store (engine before "
                     "2026-12-03 04:05 UTC; median)", fmt_time(median(a["incremental_store_sql_s"])),
                     "same cursors and active alerts" if a.get("same") else "DIFFERENT cursors or active alerts"])
    sec.tables.append(Table("Query latency on the live store", ["query", "time", "check"], rows,
                            f"series ≤ {max(p['series_points'])} points; heatmap {p['heatmap_layers']} layers, "
                            f"{p['heatmap_cells']:,} cells; gap via {p['gap_source']}."))
    p95 = percentile(p["series_s"], 95)
    hm = median(p["heatmap_s"])
    ok_s, ok_h = checks.get("series", False), checks.get("heatmap", False)
    sec.budgets.append(Budget(f"one series of {gen['steps']:,} steps, live", "p95 ≤ 100 ms", fmt_time(p95),
                              verdict(p95 <= SERIES_BUDGET_S and ok_s), checked("series")))
    sec.budgets.append(Budget(f"heatmap {gen['layers']} layers × {gen['steps']:,} steps, live", "≤ 250 ms",
                              fmt_time(hm), verdict(hm <= HEATMAP_BUDGET_S and ok_h), checked("heatmap")))
    if fr.get("open_read_s"):
        t = median(fr["open_read_s"])
        sec.budgets.append(Budget("fresh process: open the store + read one 2,000-step series", "≤ 20 ms", fmt_time(t),
                                  verdict(t <= FRESH_BUDGET_S and checks.get("fresh-process series", False)),
                                  f"imports {fmt_time(median(fr['import_s']))} and interpreter start "
                                  f"{fmt_time(median(fr['interpreter_s']))} excluded"))
    if "incremental_s" in a:
        sec.budgets.append(Budget(
            "alert latency after a flush (one incremental evaluation, default pack), live",
            "≤ 5 s (one evaluation interval)", fmt_time(a["incremental_s"]),
            verdict(a["incremental_s"] <= ALERT_BUDGET_S),
            (f"first evaluation, start=latest (one window): {fmt_time(a['backfill_s'])}"
             if a.get("start") == "latest" else
             f"first evaluation (replays the whole history): {fmt_time(a['backfill_s'])}")))
    elif a:
        sec.budgets.append(Budget("alert latency after a flush, live", "≤ 5 s", a.get("skipped") or "error", NA,
                                  a.get("error", "")[:120]))
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
