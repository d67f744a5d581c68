"""Benchmark 3: ingest into the store, from one writer and from 8 concurrent writer processes.

A segment is what one Monitor flush of a 108-layer model hands to its writer: 100 steps x 108
layers x 3 metrics = 32,400 ``layer_stats`` rows. Measured:

* ``StoreWriter.write`` of Arrow tables (the store's ingest path): rows per wall second and per
  CPU second of the process (pyarrow may use more than one thread; per CPU second is the
  per-core figure the budget speaks of);
* the same followed by ``compact_own`` after every segment (a live writer's steady state: each
  row is rewritten once per merge level);
* ``StoreWriter.write`` of the column lists the Monitor's row builder produces;
* 8 writer processes (8 ranks of one run) started together behind a barrier.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    Budget,
    Job,
    Section,
    Table,
    child_main,
    dir_bytes,
    emit_progress,
    fmt_bytes,
    fmt_count,
    fmt_rate,
    fmt_time,
    verdict,
)

LAYERS, METRICS, STEPS_PER_SEGMENT = 108, ("resid_rms", "resid_rms_max", "wgrad_norm"), 100
BUDGET_PER_CORE = 2_000_000
TYPES = ("mamba", "moe", "mamba", "moe", "attention", "moe")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def segment_columns(first_step: int, steps: int = STEPS_PER_SEGMENT, layers: int = LAYERS,
                    seed: int = 0) -> dict[str, Any]:
    """NumPy columns of one flush's ``layer_stats`` rows, in the Monitor's order (step, metric, layer)."""
    import numpy as np

    rng = np.random.default_rng(seed + first_step)
    n = steps * len(METRICS) * layers
    step = np.repeat(np.arange(first_step, first_step + steps, dtype=np.int64), len(METRICS) * layers)
    layer = np.tile(np.arange(layers, dtype=np.int32), steps * len(METRICS))
    metric_idx = np.tile(np.repeat(np.arange(len(METRICS)), layers), steps)
    return {
        "attempt": np.ones(n, dtype=np.int32),
        "step": step,
        "tokens": (step + 1) * 1_048_576,
        "layer": layer,
        "layer_type": np.array(TYPES, dtype=object)[layer % len(TYPES)],
        "metric": np.array(METRICS, dtype=object)[metric_idx],
        "value": rng.lognormal(0.0, 0.3, n),
    }


def _arrow(cols: dict[str, Any]) -> Any:
    import pyarrow as pa

    from healthwatch.schema import TABLES

    schema = TABLES["layer_stats"]
    return pa.Table.from_pydict({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)


def _single(root: Path, mode: str, segments: int, label: str, done0: int, total: int) -> dict[str, Any]:
    import pyarrow.compute as pc

    from healthwatch.store import StoreWriter

    tables = [_arrow(segment_columns(i * STEPS_PER_SEGMENT)) for i in range(min(segments, 16))]
    lists = {k: v.tolist() for k, v in segment_columns(0).items()} if mode == "lists" else None
    writer = StoreWriter(root, "ingest", attempt=1, rank=0)
    # Creates the store and warms the code up (not timed), in another run: the timed writer's
    # steps then only go forward.
    StoreWriter(root, "warmup", attempt=1, rank=0).write("layer_stats", tables[0])
    rows = 0
    c0, t0 = _cpu_s(), time.perf_counter()
    for i in range(segments):
        if lists is not None:
            writer.write("layer_stats", lists)
            rows += len(lists["step"])
        else:
            t = tables[i % len(tables)]
            lap = i // len(tables)
            if lap:  # later laps: later steps, so the writer sees a run going forward (as a live one does)
                shift = lap * len(tables) * STEPS_PER_SEGMENT
                t = t.set_column(1, "step", pc.add(t["step"], shift)).set_column(
                    2, "tokens", pc.add(t["tokens"], shift * 1_048_576))
            writer.write("layer_stats", t)
            rows += t.num_rows
            if mode == "merge":
                writer.compact_own("layer_stats")
        if i % max(1, segments // 20) == 0:
            emit_progress(done0 + i + 1, total, label)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    files = len(list((root / "table=layer_stats" / "run=ingest").glob("*.parquet")))
    return {"rows": rows, "wall_s": wall, "cpu_s": cpu, "rows_per_s": rows / wall, "rows_per_cpu_s": rows / cpu,
            "files": files, "bytes": dir_bytes(root)}


def _worker(root: str, rank: int, segments: int, barrier: Any, queue: Any) -> None:
    from healthwatch.store import StoreWriter

    tables = [_arrow(segment_columns(i * STEPS_PER_SEGMENT, seed=rank)) for i in range(min(segments, 8))]
    writer = StoreWriter(root, "ingest8", attempt=1, rank=rank)
    barrier.wait()
    c0, t0 = _cpu_s(), time.perf_counter()
    rows = 0
    for i in range(segments):
        t = tables[i % len(tables)]
        writer.write("layer_stats", t)
        rows += t.num_rows
    queue.put({"rank": rank, "rows": rows, "start": t0, "end": time.perf_counter(), "cpu_s": _cpu_s() - c0})


def run_ingest(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: single-writer modes, then ``procs`` concurrent writer processes."""
    import os

    from healthwatch.store import init_store

    segments = int(params.get("segments", 100))
    procs = int(params.get("procs", 8))
    per_proc = int(params.get("segments_per_proc", max(1, segments // 2)))
    base = Path(params["workdir"]) / "ingest"
    shutil.rmtree(base, ignore_errors=True)
    out: dict[str, Any] = {"rows_per_segment": STEPS_PER_SEGMENT * LAYERS * len(METRICS), "segments": segments}
    total = 3 * segments + 1
    for k, mode in enumerate(("arrow", "merge", "lists")):
        root = base / mode
        out[mode] = _single(root, mode, segments, f"one writer: {mode}", k * segments, total)
        shutil.rmtree(root, ignore_errors=True)

    root = base / "concurrent"
    init_store(root)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(str(root), r, per_proc, barrier, queue)) for r in range(procs)]
    for w in workers:
        w.start()
    barrier.wait(timeout=600)
    emit_progress(3 * segments, total, f"{procs} writer processes")
    results = [queue.get(timeout=1800) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    emit_progress(total, total, f"{procs} writer processes")
    rows = sum(r["rows"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    cores = min(procs, len(os.sched_getaffinity(0)))
    out["concurrent"] = {
        "procs": procs, "rows": rows, "wall_s": wall, "cpu_s": sum(r["cpu_s"] for r in results),
        "rows_per_s": rows / wall, "cores": cores, "rows_per_s_per_core": rows / wall / cores,
        "rows_per_cpu_s": rows / sum(r["cpu_s"] for r in results), "bytes": dir_bytes(root),
    }
    shutil.rmtree(base, ignore_errors=True)
    return out


TASKS = {"ingest": run_ingest}


def jobs(quick: bool, workdir: Path) -> list[Job]:
    """The child tasks of this benchmark."""
    params = {"segments": 15 if quick else 150, "procs": 8, "segments_per_proc": 4 if quick else 40,
              "workdir": str(workdir)}
    return [Job("ingest", "benchmarks.bench_ingest", "ingest", params, "ingest", timeout_s=600 if quick else 2400)]


def section(results: dict[str, dict[str, Any]]) -> Section:
    """Budget rows and a table from the ingest measurements."""
    sec = Section("ingest", "3. Ingest into the store")
    r = results.get("ingest")
    if r is None or "error" in r:
        sec.errors.append((r or {}).get("error", "did not run"))
        sec.budgets.append(Budget("ingest, one writer", "≥ 2M rows/s per core", "error", "n/a"))
        return sec
    seg = r["rows_per_segment"]
    sec.intro = (
        f"Segments of {fmt_count(seg)} `layer_stats` rows (one flush of 100 steps × {LAYERS} layers × "
        f"{len(METRICS)} metrics), zstd Parquet, published with an atomic rename. {r['segments']} segments per "
        "single-writer mode. Per core = rows per CPU-second of the writing process(es)."
    )
    rows = []
    labels = {"arrow": "one writer, `StoreWriter.write(Arrow table)`",
              "merge": "one writer, write (live rollups) + `compact_own` after each segment (live steady state)",
              "lists": "one writer, `StoreWriter.write(column lists)` (the Monitor's row builder output)"}
    for mode in ("arrow", "merge", "lists"):
        m = r[mode]
        rows.append([labels[mode], fmt_count(m["rows"]), fmt_time(m["wall_s"]), fmt_rate(m["rows_per_s"]),
                     fmt_rate(m["rows_per_cpu_s"]), str(m.get("files", "")), fmt_bytes(m["bytes"])])
    c = r["concurrent"]
    rows.append([f"{c['procs']} writer processes (ranks of one run), aggregate", fmt_count(c["rows"]),
                 fmt_time(c["wall_s"]), fmt_rate(c["rows_per_s"]), fmt_rate(c["rows_per_cpu_s"]), "",
                 fmt_bytes(c["bytes"])])
    sec.tables.append(Table("Ingest", ["writer", "rows", "wall", "rows/s (wall)", "rows per CPU-s", "files",
                                       "on disk"], rows,
                            f"{c['procs']} processes share {c['cores']} usable cores: aggregate "
                            f"{fmt_rate(c['rows_per_s'])} = {fmt_rate(c['rows_per_s_per_core'])} per core (wall)."))
    one = r["arrow"]
    per_core_one = one["rows_per_cpu_s"]
    sec.budgets.append(Budget("ingest, one writer (Arrow segments)", "≥ 2M rows/s per core",
                              f"{fmt_rate(one['rows_per_s'])} wall, {fmt_rate(one['rows_per_cpu_s'])} per CPU-s",
                              verdict(per_core_one >= BUDGET_PER_CORE)))
    per_core = c["rows_per_cpu_s"]
    sec.budgets.append(Budget(f"ingest, {c['procs']} concurrent writer processes", "≥ 2M rows/s per core",
                              f"{fmt_rate(c['rows_per_s'])} aggregate on {c['cores']} cores "
                              f"({fmt_rate(c['rows_per_s_per_core'])}/core by wall), "
                              f"{fmt_rate(c['rows_per_cpu_s'])} per CPU-s", verdict(per_core >= BUDGET_PER_CORE),
                              "verdict on rows per CPU-second (other tenants' load lowers the wall figure)"))
    lists = r["lists"]
    sec.budgets.append(Budget("ingest, one writer, Monitor's column lists", "≥ 2M rows/s per core",
                              f"{fmt_rate(lists['rows_per_s'])} wall, {fmt_rate(lists['rows_per_cpu_s'])} per CPU-s",
                              verdict(lists["rows_per_cpu_s"] >= BUDGET_PER_CORE)))
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
