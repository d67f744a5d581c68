"""Benchmark 4: queries at scale, before and after compaction.

A synthetic store is generated with vectorised NumPy + pyarrow (no Monitor in the loop): one run
of ``steps`` steps x 108 layers x 3 layer metrics (``resid_rms``, ``resid_rms_max``,
``wgrad_norm``; 3.24 x 10^8 rows at 1M steps) plus 3 loss scalars per step, and a BF16 branch
run (``parent`` = the first, from the middle, for a tenth of the steps, its tokens offset by a
third of a step so that comparisons need the token-aligned ASOF join).

"Before compaction" is the layout a live writer leaves: its self-merges (``compact_own``, fan-out
8, one L0 segment per 100-step flush) leave at most 7 segments per level, each merged segment
sorted by (metric, layer, step), L0 segments in step order, no rollups. "After compaction" is
``compact_store``: one sorted segment per table and run, plus rollups of 100, 1,000 and 10,000 steps.

Timed with healthwatch's named queries: one downsampled series (``query.series``, ≤ 2,000 points,
p50/p95 over ≥ 20 calls on random layers), a layer x step heatmap (``query.heatmap``, 400 buckets),
the token-aligned relative gap between the two runs (``healthwatch.compare.relative_gap``), and one
incremental alert evaluation (``healthwatch.alerts.engine.Evaluator``) after a new flush lands.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
import uuid
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
FLUSH_STEPS, FANOUT = 100, 8
ROW_GROUP = 122_880
SERIES_BUDGET_S, HEATMAP_BUDGET_S, ALERT_BUDGET_S = 0.100, 0.250, 5.0
#: Bytes per layer_stats row on disk (zstd Parquet, random float64 values), measured.
BYTES_PER_ROW = 15.0


# --------------------------------------------------------------------------------------------
# synthetic store


def level_plan(steps: int, flush_steps: int = FLUSH_STEPS, fanout: int = FANOUT) -> list[tuple[int, int, int, int]]:
    """Segments a live writer leaves after ``steps`` steps: ``(level, first_step, end_step, last_flush)``.

    One L0 segment per flush; ``fanout`` segments of a level merge into one of the next level,
    so the counts per level are the base-``fanout`` digits of the number of flushes.
    """
    nflush = math.ceil(steps / flush_steps)
    top = 0
    while fanout ** (top + 1) <= nflush:
        top += 1
    plan, flush = [], 0
    for level in range(top, -1, -1):
        size = fanout**level
        while nflush - flush >= size:
            plan.append((level, flush * flush_steps, min(steps, (flush + size) * flush_steps), flush + size - 1))
            flush += size
    return plan


def _layer_values(metric: int, layer: int, steps: Any, rng: Any) -> Any:
    import numpy as np

    base = (1.0 + 0.02 * layer, 3.0 + 0.05 * layer, 0.5 / (1.0 + layer / 20.0))[metric]
    v = base * (1.0 + 0.05 * np.sin(steps / 25_000.0 + layer)) * (1.0 + 0.01 * rng.standard_normal(steps.shape[0]))
    v[steps % 99_991 == 77] *= 6.0  # rare spikes that downsampling must keep
    return v


def _loss(steps: Any, rng: Any) -> Any:

    return 2.0 + 8.0 / (1.0 + steps / 5_000.0) + 0.01 * rng.standard_normal(steps.shape[0])


class _SegmentWriter:
    """Writes one segment file in row groups, publishing it with an atomic rename."""

    def __init__(self, directory: Path, name: str, table: str) -> None:
        import pyarrow.parquet as pq

        from healthwatch.schema import TABLES

        directory.mkdir(parents=True, exist_ok=True)
        self.final = directory / name
        self.tmp = directory / f".tmp-{uuid.uuid4().hex}.partial"
        self.schema = TABLES[table]
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.pending: list[Any] = []
        self.n = 0

    def add(self, cols: dict[str, Any]) -> None:
        import pyarrow as pa

        arrays = []
        for f in self.schema:
            c = cols[f.name]
            arrays.append(c if isinstance(c, pa.Array) else pa.array(c, type=f.type))
        self.pending.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self.n += len(arrays[0])
        if self.n >= 8 * ROW_GROUP:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP)
        self.pending, self.n = [], 0

    def close(self) -> None:
        self._write()
        self.writer.close()
        os.rename(self.tmp, self.final)


def _write_layer_segment(directory: Path, name: str, level: int, a: int, b: int, layers: int, seed: int) -> int:
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng((seed, a))
    w = _SegmentWriter(directory, name, "layer_stats")
    steps = np.arange(a, b, dtype=np.int64)
    n = b - a
    if level == 0:  # a fresh flush: step-major, as the Monitor's row builder emits it
        per_step = len(METRICS) * layers
        vals = np.empty((n, len(METRICS), layers))
        for m in range(len(METRICS)):
            for layer in range(layers):
                vals[:, m, layer] = _layer_values(m, layer, steps, rng)
        layer_idx = np.tile(np.arange(layers, dtype=np.int32), n * len(METRICS))
        w.add({
            "attempt": np.ones(n * per_step, dtype=np.int32),
            "step": np.repeat(steps, per_step),
            "tokens": np.repeat((steps + 1) * TOKENS_PER_STEP, per_step),
            "layer": layer_idx,
            "layer_type": np.array(LAYER_TYPES, dtype=object)[layer_idx % len(LAYER_TYPES)],
            "metric": np.array(METRICS, dtype=object)[np.tile(np.repeat(np.arange(len(METRICS)), layers), n)],
            "value": vals.reshape(-1),
        })
    else:  # a merged segment: sorted by (metric, layer, step)
        ones = pa.array(np.ones(n, dtype=np.int32))
        step_arr, tok_arr = pa.array(steps), pa.array((steps + 1) * TOKENS_PER_STEP)
        for m, metric in enumerate(METRICS):
            for layer in range(layers):
                w.add({
                    "attempt": ones, "step": step_arr, "tokens": tok_arr,
                    "layer": pa.repeat(pa.scalar(layer, pa.int32()), n),
                    "layer_type": pa.repeat(pa.scalar(LAYER_TYPES[layer % len(LAYER_TYPES)]), n),
                    "metric": pa.repeat(pa.scalar(metric), n),
                    "value": _layer_values(m, layer, steps, rng),
                })
    w.close()
    return n * len(METRICS) * layers


def _write_scalar_segment(directory: Path, name: str, a: int, b: int, seed: int, token_offset: int = 0,
                          loss_scale: float = 1.0) -> int:
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng((seed, a, 7))
    steps = np.arange(a, b, dtype=np.int64)
    n = b - a
    loss = _loss(steps, rng) * loss_scale
    w = _SegmentWriter(directory, name, "scalars")
    for k, sname in enumerate(SCALARS):
        w.add({
            "attempt": np.ones(n, dtype=np.int32), "step": steps,
            "tokens": (steps + 1) * TOKENS_PER_STEP + token_offset,
            "name": pa.repeat(pa.scalar(sname), n), "value": loss * (1.0 + 0.05 * k),
            "wall_time": 1.7e9 + steps.astype(np.float64),
        })
    w.close()
    return n * len(SCALARS)


def generate_store(root: Path, steps: int, layers: int = 108, seed: int = 0,
                   progress: Any = None) -> dict[str, Any]:
    """Write the synthetic store (see the module docstring); returns sizes and the time taken."""
    from healthwatch.store.segments import table_dir
    from healthwatch.store import StoreWriter, init_store

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    init_store(root)
    ref_first = steps // 2
    ref_steps = max(1_000, steps // 10)
    for run, parent, branch, precision in ((RUN, None, None, "nvfp4"), (REF_RUN, RUN, ref_first, "bf16")):
        w = StoreWriter(root, run)
        w.write("runs", {"parent": [parent], "branch_step": [branch], "branch_tokens": [None],
                         "precision": [precision], "config": ["{}"], "created": [time.time()],
                         "schema_version": ["1.0"]})
        w.write("attempts", {"attempt": [1], "start_step": [0 if parent is None else branch],
                             "started_at": [time.time()], "host": ["bench"], "reason": ["start"],
                             "schema_version": ["1.0"]})
    plan = level_plan(steps)
    writer_id = f"a0001r00000x{uuid.uuid4().hex[:8]}"
    rows = 0
    total = sum(b - a for _, a, b, _ in plan)
    done = 0
    for level, a, b, last in plan:
        name = f"{writer_id}-{last:09d}-L{level}.parquet"
        rows += _write_layer_segment(table_dir(root, "layer_stats", RUN), name, level, a, b, layers, seed)
        rows += _write_scalar_segment(table_dir(root, "scalars", RUN), name, a, b, seed)
        done += b - a
        if progress is not None:
            progress(done, total)
    ref_id = f"a0001r00000x{uuid.uuid4().hex[:8]}"
    rows += _write_scalar_segment(table_dir(root, "scalars", REF_RUN), f"{ref_id}-{0:09d}-L1.parquet",
                                  ref_first, ref_first + ref_steps, seed + 1, token_offset=TOKENS_PER_STEP // 3,
                                  loss_scale=0.997)
    return {"steps": steps, "layers": layers, "rows": rows, "layer_rows": steps * layers * len(METRICS),
            "segments": len(plan), "levels": sorted({lv for lv, *_ in plan}), "ref_steps": ref_steps,
            "bytes": dir_bytes(root), "gen_s": time.perf_counter() - t0}


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


def _alert_eval(root: Path, steps: int, layers: int) -> dict[str, Any]:
    """One backfill and one incremental evaluation of the default rule pack, if the evaluator exists."""
    try:
        from healthwatch.alerts.engine import Evaluator  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"skipped": f"healthwatch.alerts.engine not importable ({exc})"}
    try:
        # A first evaluation replays the whole history (~0.5M rows/s here: minutes at 1M steps x
        # 108 layers); a daemon started on a store that large starts at the newest step instead.
        start = "latest" if steps > ALERT_HISTORY_MAX_STEPS else "history"
        ev = Evaluator(root, "default", runs=[RUN, REF_RUN], start=start)
        t0 = time.perf_counter()
        ev.evaluate_once()
        backfill = time.perf_counter() - t0
        appended = _append_flush(root, steps, layers)
        t0 = time.perf_counter()
        ev.evaluate_once()
        incremental = time.perf_counter() - t0
        ev.close()
    except Exception as exc:  # noqa: BLE001 - an evaluator in progress must not sink the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"backfill_s": backfill, "incremental_s": incremental, "appended_rows": appended, "start": start}


def run_generate(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: generate the synthetic store."""
    root = Path(params["workdir"]) / "query-store"
    return generate_store(root, int(params["steps"]), int(params.get("layers", 108)), int(params.get("seed", 0)),
                          progress=lambda d, t: emit_progress(d, t, "generating"))


def run_queries(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: time the named queries on the store as it is now (``phase`` labels it)."""
    import healthwatch as hw
    from healthwatch import query

    root = Path(params["workdir"]) / "query-store"
    steps, layers = int(params["steps"]), int(params.get("layers", 108))
    repeats, heat_repeats = int(params.get("repeats", 20)), int(params.get("heat_repeats", 5))
    rng = random.Random(int(params.get("seed", 0)))
    total = 1 + repeats + 5 + 1 + heat_repeats + 3 + 2
    done = 0

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        emit_progress(done, total, label)

    t0 = time.perf_counter()
    store = hw.open_store(root)
    open_s = time.perf_counter() - t0
    out: dict[str, Any] = {"phase": params["phase"], "open_s": open_s,
                           "files": len(store.files("layer_stats", RUN)), "bytes": dir_bytes(root)}
    # one downsampled layer series
    t0 = time.perf_counter()
    df = query.series(store, RUN, "resid_rms", layer=rng.randrange(layers), max_points=2000)
    out["series_cold_s"] = time.perf_counter() - t0
    tick("series")
    times, points = [], []
    for _ in range(repeats):
        layer = rng.randrange(layers)
        t0 = time.perf_counter()
        df = query.series(store, RUN, "resid_rms", layer=layer, max_points=2000)
        times.append(time.perf_counter() - t0)
        points.append(df.height)
        tick("series")
    out["series_s"], out["series_points"] = times, points
    # one downsampled scalar series (loss)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        df = query.series(store, RUN, "loss/train", max_points=2000)
        times.append(time.perf_counter() - t0)
        tick("loss series")
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
    # one incremental alert evaluation (appends a flush: keep it last)
    out["alerts"] = _alert_eval(root, steps, layers)
    tick("alerts")
    tick("done")
    return out


def run_compact(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: ``compact_store`` (merge + rollups), timed."""
    from healthwatch.store import compact_store

    root = Path(params["workdir"]) / "query-store"
    files_before = sum(1 for _ in root.rglob("*.parquet"))
    bytes_before = dir_bytes(root)
    emit_progress(0, 1, "compacting")
    t0 = time.perf_counter()
    merged = compact_store(root)
    wall = time.perf_counter() - t0
    emit_progress(1, 1, "compacting")
    rollup_bytes = dir_bytes(root / "table=layer_stats_rollup")
    return {"compact_s": wall, "merged": merged, "files_before": files_before,
            "files_after": sum(1 for _ in root.rglob("*.parquet")), "bytes_before": bytes_before,
            "bytes_after": dir_bytes(root), "rollup_bytes": rollup_bytes}


TASKS = {"generate": run_generate, "queries": run_queries, "compact": run_compact}


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
    """Generate, query, compact, query again (each a child task)."""
    n = steps if steps is not None else (20_000 if quick else 1_000_000)
    base = {"workdir": str(workdir), "steps": n, "layers": 108, "seed": 0}
    q = dict(base, repeats=20, heat_repeats=3 if quick else 5)
    scale = max(1.0, n / 100_000)
    return [
        Job("query:generate", "benchmarks.bench_query", "generate", base, f"query: generate {n:,} steps",
            timeout_s=300 + 120 * scale),
        Job("query:live", "benchmarks.bench_query", "queries", dict(q, phase="live"),
            "query: before compaction", timeout_s=300 + 200 * scale),
        Job("query:compact", "benchmarks.bench_query", "compact", base, "query: compact_store",
            timeout_s=300 + 200 * scale),
        Job("query:compacted", "benchmarks.bench_query", "queries", dict(q, phase="compacted"),
            "query: after compaction", timeout_s=300 + 100 * scale),
    ]


def section(results: dict[str, dict[str, Any]], size_note: str = "") -> Section:
    """Budget rows and tables from the query phases."""
    sec = Section("query", "4. Queries at scale")
    gen = results.get("query:generate")
    if gen is None or "error" in gen:
        sec.errors.append((gen or {}).get("error", "did not run"))
        sec.budgets.append(Budget("chart query, one series", "p95 ≤ 100 ms", "error", NA))
        sec.budgets.append(Budget("layer × step heatmap", "≤ 250 ms", "error", NA))
        return sec
    sec.intro = (
        f"Synthetic store: run `{RUN}` with {gen['steps']:,} steps × {gen['layers']} layers × {len(METRICS)} "
        f"metrics = {gen['layer_rows']:,} `layer_stats` rows (+ {len(SCALARS)} loss scalars per step), and a BF16 "
        f"branch `{REF_RUN}` of {gen['ref_steps']:,} steps; {fmt_bytes(gen['bytes'])} of Parquet in "
        f"{gen['segments']} segments per table (levels {gen['levels']}), generated in {fmt_time(gen['gen_s'])}."
        + (f" **Size {size_note}.**" if size_note else "")
    )
    comp = results.get("query:compact", {})
    headers = ["query", "before compaction", "after compaction"]
    phases = [results.get("query:live"), results.get("query:compacted")]

    def cell(p: dict[str, Any] | None, fn: Any) -> str:
        if p is None:
            return "did not run"
        if "error" in p:
            return "error"
        try:
            return fn(p)
        except (KeyError, TypeError, ValueError):
            return "—"

    def alert_cell(p: dict[str, Any]) -> str:
        a = p.get("alerts", {})
        if "skipped" in a:
            return "skipped"
        if "error" in a:
            return "error: " + a["error"][:80]
        first = "first, start=latest" if a.get("start") == "latest" else "first: whole history"
        return f"{fmt_time(a['incremental_s'])} ({first} {fmt_time(a['backfill_s'])})"

    rows = [
        ["store files (layer_stats, this run)", *(cell(p, lambda p: str(p["files"])) for p in phases)],
        ["open store (list + views)", *(cell(p, lambda p: fmt_time(p["open_s"])) for p in phases)],
        ["one layer series ≤ 2,000 pts: p50", *(cell(p, lambda p: fmt_time(median(p["series_s"]))) for p in phases)],
        ["one layer series: p95", *(cell(p, lambda p: fmt_time(percentile(p["series_s"], 95))) for p in phases)],
        ["one layer series: first call", *(cell(p, lambda p: fmt_time(p["series_cold_s"])) for p in phases)],
        ["loss series (scalar) p50", *(cell(p, lambda p: fmt_time(median(p["loss_series_s"]))) for p in phases)],
        ["heatmap 108 layers × 400 buckets: p50", *(cell(p, lambda p: fmt_time(median(p["heatmap_s"])))
                                                     for p in phases)],
        ["heatmap: first call", *(cell(p, lambda p: fmt_time(p["heatmap_cold_s"])) for p in phases)],
        ["token-aligned gap between the runs: p50", *(cell(p, lambda p: fmt_time(median(p["gap_s"])))
                                                       for p in phases)],
        ["one incremental alert evaluation", *(cell(p, alert_cell) for p in phases)],
    ]
    notes = []
    live, compacted = phases
    if compacted and "series_points" in compacted:
        notes.append(f"series returned ≤ {max(compacted['series_points'])} points; heatmap "
                     f"{compacted['heatmap_layers']} layers, {compacted['heatmap_cells']:,} cells; gap "
                     f"via {compacted['gap_source']} ({compacted.get('gap_rows')} rows).")
    if comp and "compact_s" in comp:
        notes.append(f"`compact_store` took {fmt_time(comp['compact_s'])}: {comp['files_before']} → "
                     f"{comp['files_after']} files, {fmt_bytes(comp['bytes_before'])} → {fmt_bytes(comp['bytes_after'])} "
                     f"(rollups {fmt_bytes(comp['rollup_bytes'])}).")
    elif comp and "error" in comp:
        notes.append(f"compaction failed: {comp['error']}")
    sec.tables.append(Table("Query latency", headers, rows, " ".join(notes)))
    for name, p in (("before compaction", live), ("after compaction", compacted)):
        if p is None or "error" in p:
            if p is not None:
                sec.errors.append(f"{name}: {p['error']}")
            continue
        judged = name == "after compaction"
        p95 = percentile(p["series_s"], 95)
        hm = median(p["heatmap_s"])
        sec.budgets.append(Budget(f"one series of {gen['steps']:,} steps, {name}", "p95 ≤ 100 ms", fmt_time(p95),
                                  verdict(p95 <= SERIES_BUDGET_S) if judged else NA,
                                  "" if judged else "informative: a live writer's layout"))
        sec.budgets.append(Budget(f"heatmap {gen['layers']} layers × {gen['steps']:,} steps, {name}", "≤ 250 ms",
                                  fmt_time(hm), verdict(hm <= HEATMAP_BUDGET_S) if judged else NA,
                                  "" if judged else "informative: no rollups before compaction"))
        a = p.get("alerts", {})
        if "incremental_s" in a:
            sec.budgets.append(Budget(
                f"alert latency after a flush (one incremental evaluation, default pack), {name}",
                "≤ 5 s (one evaluation interval)", fmt_time(a["incremental_s"]),
                verdict(a["incremental_s"] <= ALERT_BUDGET_S),
                (f"first evaluation, start=latest (one window): {fmt_time(a['backfill_s'])}"
                 if a.get("start") == "latest" else
                 f"first evaluation (replays the whole history): {fmt_time(a['backfill_s'])}")))
        elif a:
            sec.budgets.append(Budget(f"alert latency after a flush, {name}", "≤ 5 s", a.get("skipped") or
                                      "error", NA, a.get("error", "")[:120]))
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
