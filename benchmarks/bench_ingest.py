"""Benchmark 3: ingest into the store, from one writer and from 8 concurrent writer processes.

A segment is what one Monitor flush of a 108-layer model hands to its writer: 100 steps x 108
layers x 3 metrics = 32,400 ``layer_stats`` rows. Measured:

* ``StoreWriter.write`` of Arrow tables (the store's ingest path): rows per wall second and per
  CPU second of the process (pyarrow may use more than one thread; per CPU second is the
  per-core figure the budget speaks of);
* the same followed by ``compact_own`` after every segment (a live writer's steady state: each
  row is rewritten once per merge level);
* ``StoreWriter.write`` of the column lists the Monitor's row builder produces;
* a live writer in the Monitor's layout (:func:`monitor_flush`: each flush's scalars and
  ``layer_stats`` as ``healthwatch.hooks.rows.RowBuilder`` hands them over, written and
  self-merged as ``MonitorWriter._write_tables`` does: ``write`` with live 100/1,000/10,000-step
  rollups, then ``compact_own`` per table), over 20,000 and 100,000 steps: the second seals
  segments (the tiered merge's last level), so it is the steady state of a long run. CPU of the
  writer calls only (``time.process_time``), the rows built beforehand;
* 8 writer processes (8 ranks of one run) started together behind a barrier.

Before/after comparisons of the live writer (issue 15) run this file by path against two trees
(``--ab``): the data and the timing are this file's, the ``healthwatch`` under test is the one on
each run's ``PYTHONPATH``; runs alternate between the trees::

    git worktree add /tmp/before <commit>
    python benchmarks/bench_ingest.py --ab /tmp/before . --steps 20000 100000 --reps 3
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path (``--ab``): ``benchmarks`` from this checkout, after PYTHONPATH's
    import sys as _sys

    _sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_common import (  # noqa: E402 - after the path fix above
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


SCALAR_NAMES = ("loss/train", "loss/mtp_1", "loss/mtp_2")
TOKENS_PER_STEP = 1 << 20


def monitor_flush(first_step: int, steps: int = STEPS_PER_SEGMENT, layers: int = LAYERS,
                  seed: int = 0) -> tuple[dict[str, Any], Any]:
    """One flush as the Monitor's row builder hands it to the writer: the scalars as column lists
    (``name`` a list of str), ``layer_stats`` as an Arrow table, both step-major (each step: its
    scalars; each metric's block of every layer), strings dictionary-encoded with one entry per
    distinct word (what ``RowBuilder.layers`` builds; a test checks the two agree)."""
    import numpy as np
    import pyarrow as pa

    from healthwatch.schema import TABLES

    rng = np.random.default_rng((seed, first_step))
    st = np.arange(first_step, first_step + steps, dtype=np.int64)
    per = len(METRICS) * layers
    n = steps * per
    distinct = list(dict.fromkeys(TYPES))
    type_idx = np.array([distinct.index(TYPES[i % len(TYPES)]) for i in range(layers)], dtype=np.int32)
    base = np.array([1.0, 3.0, 0.5])[:, None] * (1.0 + np.arange(layers) / 50.0)[None, :]
    values = base[None, :, :] * rng.lognormal(0.0, 0.05, (steps, len(METRICS), layers))
    values[rng.random(values.shape) < 1e-4] *= 8.0  # rare spikes, as real signals have
    layer_stats = pa.Table.from_arrays([
        pa.array(np.ones(n, dtype=np.int32)), pa.array(np.repeat(st, per)),
        pa.array(np.repeat((st + 1) * TOKENS_PER_STEP, per)), pa.array(np.tile(np.arange(layers, dtype=np.int32), steps * len(METRICS))),
        pa.DictionaryArray.from_arrays(pa.array(np.tile(type_idx, steps * len(METRICS))), pa.array(distinct, pa.string())),
        pa.DictionaryArray.from_arrays(pa.array(np.tile(np.repeat(np.arange(len(METRICS), dtype=np.int32), layers), steps)),
                                       pa.array(list(METRICS), pa.string())),
        pa.array(values.reshape(-1)),
    ], names=TABLES["layer_stats"].names)
    k = len(SCALAR_NAMES)
    loss = 2.0 + 8.0 / (1.0 + st / 5_000.0)
    scalars = {
        "attempt": np.ones(steps * k, dtype=np.int32), "step": np.repeat(st, k),
        "tokens": np.repeat((st + 1) * TOKENS_PER_STEP, k), "name": list(SCALAR_NAMES) * steps,
        "value": (loss[:, None] * (1.0 + 0.05 * np.arange(k))[None, :] + 0.01 * rng.standard_normal((steps, k))).reshape(-1),
        "wall_time": np.repeat(1.7e9 + st.astype(np.float64), k),
    }
    return scalars, layer_stats


def live_ingest(root: Path, steps: int, layers: int = LAYERS, progress: Any = None) -> dict[str, Any]:
    """A live writer's ingest in the Monitor's layout (see the module docstring): per flush of
    100 steps, ``write`` + ``compact_own`` of scalars and ``layer_stats``, as the Monitor's writer
    thread does. Returns rows, CPU and wall seconds of the writer calls only, files by level."""
    from healthwatch.store import StoreWriter, init_store

    shutil.rmtree(root, ignore_errors=True)
    init_store(root)
    # Warm-up in another run (imports, first-call caches), not timed.
    sc, ls = monitor_flush(0, layers=layers)
    warm = StoreWriter(root, "warmup")
    warm.write("scalars", sc)
    warm.write("layer_stats", ls)
    warm.close()
    writer = StoreWriter(root, "live")
    rows, cpu, wall = 0, 0.0, 0.0
    flushes = range(0, steps, STEPS_PER_SEGMENT)
    for i, first in enumerate(flushes):
        sc, ls = monitor_flush(first, min(STEPS_PER_SEGMENT, steps - first), layers)
        c0, t0 = time.process_time(), time.perf_counter()
        for table, cols in (("scalars", sc), ("layer_stats", ls)):
            writer.write(table, cols)
        for table in ("scalars", "layer_stats"):
            writer.compact_own(table)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - t0
        rows += len(sc["step"]) + ls.num_rows
        if progress is not None and i % max(1, len(flushes) // 20) == 0:
            progress(i + 1, len(flushes))
    c0 = time.process_time()
    writer.close()
    close_cpu = time.process_time() - c0
    names = [p.name for p in (root / "table=layer_stats" / "run=live").glob("*.parquet")]
    levels: dict[str, int] = {}
    for name in names:
        lv = name.rsplit("-", 1)[-1].removesuffix(".parquet")
        levels[lv] = levels.get(lv, 0) + 1
    return {"steps": steps, "rows": rows, "cpu_s": cpu, "wall_s": wall, "close_cpu_s": close_cpu,
            "rows_per_cpu_s": rows / cpu, "rows_per_s": rows / wall, "files": len(names),
            "levels": dict(sorted(levels.items())), "bytes": dir_bytes(root / "table=layer_stats" / "run=live"),
            "load": list(os.getloadavg())}


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
    """Child task: single-writer modes, the live writer, then ``procs`` concurrent writer processes."""
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

    out["live"] = []
    for steps in params.get("live_steps", [20_000, 100_000]):
        out["live"].append(live_ingest(base / "live", int(steps),
                                       progress=lambda d, t, s=steps: emit_progress(3 * segments, total, f"live writer, {s} steps ({d}/{t})")))
        shutil.rmtree(base / "live", ignore_errors=True)

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
              "live_steps": [5_000] if quick else [20_000, 100_000], "workdir": str(workdir)}
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
    for lv in r.get("live", []):
        levels = ", ".join(f"{n} × {k}" for k, n in lv["levels"].items())
        rows.append([f"one writer, live merging + rollups, Monitor layout, {fmt_count(lv['steps'])} steps × {LAYERS} layers "
                     f"(write + `compact_own` per flush)", fmt_count(lv["rows"]), fmt_time(lv["wall_s"]),
                     fmt_rate(lv["rows_per_s"]), fmt_rate(lv["rows_per_cpu_s"]), f"{lv['files']} ({levels})",
                     fmt_bytes(lv["bytes"])])
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
    for lv in r.get("live", []):
        sec.budgets.append(Budget(
            f"ingest, one writer, live merging + rollups, Monitor layout ({fmt_count(lv['steps'])} steps × {LAYERS} layers)",
            "≥ 2M rows/s per core", f"{fmt_rate(lv['rows_per_cpu_s'])} per CPU-s ({fmt_rate(lv['rows_per_s'])} wall)",
            verdict(lv["rows_per_cpu_s"] >= BUDGET_PER_CORE),
            f"CPU of the writer calls only; load {lv['load'][0]:.1f} at the end"))
    return sec


def _ab_child(argv: list[str]) -> int:
    """``--live ROOT STEPS``: one live-writer run with the ``healthwatch`` on ``PYTHONPATH``; prints JSON."""
    import json

    import healthwatch

    r = live_ingest(Path(argv[0]), int(argv[1]))
    print(json.dumps(dict(r, healthwatch=str(Path(healthwatch.__file__).resolve().parent.parent))))
    return 0


def _ab(before: str, after: str, steps: list[int], reps: int, workdir: str) -> int:
    """Alternate live-writer runs of two trees (same data, same script); print each run and the medians."""
    import json
    import statistics
    import subprocess
    import sys

    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for n in steps:
        for rep in range(reps):
            for label, tree in (("before", before), ("after", after)):
                env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
                root = Path(workdir) / f"ab-{label}"
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--live", str(root), str(n)],
                                     env=env, capture_output=True, text=True, check=True, cwd=workdir)
                shutil.rmtree(root, ignore_errors=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if r["healthwatch"] != env["PYTHONPATH"]:
                    raise RuntimeError(f"{label}: imported healthwatch from {r['healthwatch']}, not {tree}")
                results.setdefault((label, n), []).append(r)
                print(f"{label:6s} steps {n:>7} rep {rep}: {r['rows_per_cpu_s'] / 1e6:.3f} M rows per CPU-s "
                      f"(CPU {r['cpu_s']:.2f} s, wall {r['wall_s']:.2f} s, files {r['files']} {r['levels']}, "
                      f"{r['bytes'] / r['rows']:.2f} B/row on disk, load {r['load'][0]:.2f})", flush=True)
    for n in steps:
        med = {lab: statistics.median(x["rows_per_cpu_s"] for x in results[(lab, n)]) for lab in ("before", "after")}
        print(f"steps {n}: median before {med['before'] / 1e6:.3f}, after {med['after'] / 1e6:.3f} M rows per CPU-s "
              f"(x{med['after'] / med['before']:.2f})")
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    if sys.argv[1:2] == ["--live"]:
        raise SystemExit(_ab_child(sys.argv[2:]))
    if sys.argv[1:2] == ["--ab"]:
        ap = argparse.ArgumentParser(description="alternating before/after runs of the live writer")
        ap.add_argument("--ab", nargs=2, metavar=("BEFORE_TREE", "AFTER_TREE"), required=True)
        ap.add_argument("--steps", nargs="+", type=int, default=[20_000, 100_000])
        ap.add_argument("--reps", type=int, default=3)
        ap.add_argument("--workdir", default="/tmp")
        a = ap.parse_args()
        raise SystemExit(_ab(a.ab[0], a.ab[1], a.steps, a.reps, a.workdir))
    raise SystemExit(child_main(TASKS))
