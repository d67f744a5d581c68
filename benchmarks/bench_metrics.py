"""Benchmark: Prometheus ``/metrics`` of a store with 50 live runs x 108 layers.

The store is written the way live trainers write it: per run, one ``StoreWriter`` publishing a
segment per flush of 100 steps (108 layers x 5 layer metrics + 20 scalars per step) and merging
its own small segments (``compact_own``), never compacted by hand. Measured:

* scrape: ``GET /metrics`` over HTTP from a running :class:`MetricsServer` (what Prometheus
  pays; the budget row): it sends the text rendered once per snapshot;
* refresh: one read of the store by the exporter's background thread (``StoreSource.snapshot``),
  cold (first, fresh process) and warm;
* correctness: every run's last step, MaxVio max / median / arg-max layer and last train loss in
  the scraped text equal a raw-SQL reference over the Parquet files computed in the same run.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    Budget,
    Job,
    Section,
    Table,
    child_main,
    emit_progress,
    fmt_count,
    fmt_time,
    percentile,
    verdict,
)

RUNS, LAYERS, FLUSH = 50, 108, 100
METRICS = ("maxvio", "dead_experts", "resid_rms", "resid_rms_max", "wgrad_norm")
SCALARS = tuple(["loss/train", "loss/mtp_1", "loss/mtp_2", "grad_norm/total", "grad_norm/output",
                 "grad_norm/embedding", "grad_norm/mtp", "lr"] + [f"opt/extra_{i}" for i in range(12)])
BUDGET_S = 0.200


def build_store(root: Path, runs: int, steps: int, layers: int = LAYERS) -> int:
    """Write ``runs`` live runs of ``steps`` steps; returns the layer_stats rows written."""
    import json

    import numpy as np
    import pyarrow as pa

    from healthwatch.schema import SCHEMA_VERSION, TABLES
    from healthwatch.store import StoreWriter

    ls_schema, sc_schema = TABLES["layer_stats"], TABLES["scalars"]
    types = np.array(["mamba", "moe", "mamba", "moe", "attention", "moe"], dtype=object)
    rows = 0
    for r in range(runs):
        run = f"run-{r:03d}"
        w = StoreWriter(root, run, attempt=1)
        now = time.time()
        w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["nvfp4"],
                         "config": [json.dumps({"i": r})], "created": [now], "schema_version": [SCHEMA_VERSION]})
        w.write("attempts", {"attempt": [1], "start_step": [0], "started_at": [now], "host": ["bench"],
                             "reason": ["start"], "schema_version": [SCHEMA_VERSION]})
        rng = np.random.default_rng(r)
        for lo in range(0, steps, FLUSH):
            n_steps = min(FLUSH, steps - lo)
            step = np.repeat(np.arange(lo, lo + n_steps, dtype=np.int64), len(METRICS) * layers)
            n = step.size
            layer = np.tile(np.arange(layers, dtype=np.int32), n_steps * len(METRICS))
            midx = np.tile(np.repeat(np.arange(len(METRICS)), layers), n_steps)
            w.write("layer_stats", pa.table({
                "attempt": pa.array(np.ones(n, np.int32)), "step": pa.array(step), "tokens": pa.array(step * 4096),
                "layer": pa.array(layer), "layer_type": pa.array(types[layer % len(types)]),
                "metric": pa.array(np.array(METRICS, dtype=object)[midx]), "value": pa.array(rng.lognormal(0, 0.4, n)),
            }, schema=ls_schema))
            s_step = np.repeat(np.arange(lo, lo + n_steps, dtype=np.int64), len(SCALARS))
            m = s_step.size
            w.write("scalars", pa.table({
                "attempt": pa.array(np.ones(m, np.int32)), "step": pa.array(s_step), "tokens": pa.array(s_step * 4096),
                "name": pa.array(np.tile(np.array(SCALARS, dtype=object), n_steps)),
                "value": pa.array(rng.normal(3, 0.1, m)), "wall_time": pa.array(np.full(m, now)),
            }, schema=sc_schema))
            w.compact_own("layer_stats")
            w.compact_own("scalars")
            rows += n
        emit_progress(r + 1, runs, "writing live runs")
    return rows


def reference(root: Path) -> dict[str, dict[str, float]]:
    """Raw-SQL reference over the Parquet files (no views): per run, last step, MaxVio aggregates, last loss."""
    import duckdb

    con = duckdb.connect()
    ls = f"read_parquet('{root}/table=layer_stats/*/*.parquet', hive_partitioning = true)"
    sc = f"read_parquet('{root}/table=scalars/*/*.parquet', hive_partitioning = true)"
    out: dict[str, dict[str, float]] = {}
    for run, step, vmax, vmed, arg in con.execute(
        f"WITH last AS (SELECT run, max(step) AS step FROM {ls} WHERE metric = 'maxvio' GROUP BY run) "
        f"SELECT l.run, l.step, max(value), median(value), arg_max(layer, value) FROM {ls} l JOIN last USING (run, step) "
        "WHERE metric = 'maxvio' GROUP BY l.run, l.step"
    ).fetchall():
        out[run] = {"step": step, "max": vmax, "median": vmed, "argmax": arg}
    for run, loss in con.execute(
        f"SELECT run, arg_max(value, step) FROM {sc} WHERE name = 'loss/train' GROUP BY run"
    ).fetchall():
        out[run]["loss"] = loss
    return out


def run_metrics(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: build the store, time refreshes and scrapes, check the values."""
    from prometheus_client.parser import text_string_to_metric_families

    from healthwatch.exporters.prometheus import MetricsServer
    from healthwatch.exporters.source import StoreSource

    runs, steps, scrapes = int(params["runs"]), int(params["steps"]), int(params["scrapes"])
    root = Path(params["workdir"]) / "metrics-store"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    rows = build_store(root, runs, steps)
    build_s = time.perf_counter() - t0
    files = sum(1 for _ in root.rglob("*.parquet"))

    src = StoreSource(root)
    t0 = time.perf_counter()
    src.snapshot()
    cold = time.perf_counter() - t0
    warm = []
    for i in range(int(params["refreshes"])):
        t0 = time.perf_counter()
        src.snapshot()
        warm.append(time.perf_counter() - t0)
        emit_progress(i + 1, int(params["refreshes"]), "store reads")
    src.close()

    server = MetricsServer(root, port=0, interval=3600.0).start()
    try:
        lat, size = [], 0
        body = b""
        for i in range(scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(server.url, timeout=60) as resp:
                body = resp.read()
            lat.append(time.perf_counter() - t0)
            size = len(body)
            emit_progress(i + 1, scrapes, "scrapes")
    finally:
        server.stop()

    ref = reference(root)
    got: dict[tuple[str, str, str], float] = {}
    series = 0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            series += 1
            got[(s.name, s.labels.get("run", ""), s.labels.get("metric", s.labels.get("name", "")))] = s.value
    bad = []
    for run, r in ref.items():
        checks = {("healthwatch_last_step", ""): r["step"], ("healthwatch_layer_max", "maxvio"): r["max"],
                  ("healthwatch_layer_median", "maxvio"): r["median"],
                  ("healthwatch_layer_argmax", "maxvio"): r["argmax"], ("healthwatch_scalar", "loss/train"): r["loss"]}
        for (name, label), want in checks.items():
            if got.get((name, run, label)) != want:
                bad.append(f"{run} {name}{{{label}}}: {got.get((name, run, label))} != {want}")
    return {"runs": runs, "steps": steps, "layers": LAYERS, "metrics": len(METRICS), "scalars": len(SCALARS),
            "layer_rows": rows, "files": files, "build_s": build_s, "refresh_cold_s": cold, "refresh_warm_s": warm,
            "scrape_s": lat, "bytes": size, "series": series, "checked_runs": len(ref), "mismatches": bad[:20]}


TASKS = {"metrics": run_metrics}


def jobs(quick: bool, workdir: Path) -> list[Job]:
    """The child task of this benchmark (quick: 100 steps per run instead of 1,000)."""
    params = {"runs": RUNS, "steps": 100 if quick else 1000, "scrapes": 20 if quick else 100,
              "refreshes": 3 if quick else 10, "workdir": str(workdir)}
    return [Job("metrics", "benchmarks.bench_metrics", "metrics", params, "prometheus /metrics",
                timeout_s=600 if quick else 2400)]


def section(results: dict[str, dict[str, Any]]) -> Section:
    """Budget row and table of the /metrics measurements."""
    sec = Section("metrics", "8. Prometheus /metrics")
    r = results.get("metrics")
    if r is None or "error" in r:
        sec.errors.append((r or {}).get("error", "did not run"))
        sec.budgets.append(Budget("`/metrics` scrape, 50 live runs × 108 layers", "≤ 200 ms", "error", "n/a"))
        return sec
    sec.intro = (
        f"{r['runs']} live runs × {r['layers']} layers × {r['metrics']} layer metrics + {r['scalars']} scalars, "
        f"{fmt_count(r['steps'])} steps each ({fmt_count(r['layer_rows'])} layer rows in {r['files']} segment files, "
        "as live writers leave them: a segment per 100-step flush plus their own merges, never compacted by hand). "
        "A scrape sends the text of the exporter's last snapshot (rendered once per snapshot); a refresh is the "
        "background read of the store that makes it (every `--interval` seconds, off the scrape path)."
    )
    scr, warm = r["scrape_s"], r["refresh_warm_s"]
    ok = not r["mismatches"]
    sec.tables.append(Table("/metrics", ["what", "p50", "p95", "max", "n"], [
        ["scrape: GET /metrics over HTTP", fmt_time(percentile(scr, 50)), fmt_time(percentile(scr, 95)),
         fmt_time(max(scr)), str(len(scr))],
        ["refresh: read the store (warm)", fmt_time(percentile(warm, 50)), fmt_time(percentile(warm, 95)),
         fmt_time(max(warm)), str(len(warm))],
        ["refresh: first read in a fresh process (cold)", fmt_time(r["refresh_cold_s"]), "", "", "1"],
    ], f"{r['series']} series, {fmt_count(r['bytes'])} bytes per scrape; values of {r['checked_runs']} runs checked "
       f"against a raw-SQL reference: {'all equal' if ok else 'MISMATCH: ' + '; '.join(r['mismatches'])}."))
    p95 = percentile(scr, 95)
    sec.budgets.append(Budget("`/metrics` scrape, 50 live runs × 108 layers", "≤ 200 ms",
                              f"p95 {fmt_time(p95)} (store read in the background: p50 "
                              f"{fmt_time(percentile(warm, 50))})",
                              verdict(p95 <= BUDGET_S and ok),
                              "values checked against raw SQL" if ok else "values differ from raw SQL"))
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
