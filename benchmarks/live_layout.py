"""Build a live store directly in the layout its writer path leaves (fast), for the benchmarks.

:func:`benchmarks.bench_query.generate_store` writes the live store the slow, honest way: 10,000
flushes through ``StoreWriter.write`` + ``compact_own``. On a 2-core machine shared by several
people that takes most of an hour at 1,000,000 steps x 108 layers. This module writes the *same
files* a live writer leaves after those flushes, without running them:

* the writer merges its own segments tiered (``merge_fanout`` 16 segments of a level into one of
  the next) until a segment holds ``seal_rows`` (4M) rows; sealed segments are never merged again.
  After ``F`` flushes of 100 steps its directory holds, oldest steps first, the base-16 digits of
  ``F`` capped at the sealed level: at 1M steps x 108 layers x 3 metrics, 39 sealed files of 256
  flushes (25,600 steps, 8.3M rows) and one of 16 flushes; each sorted by ``SORT_KEYS`` and written
  by the writer's own ``merge.write_parquet`` (sealed: raw pages, delta step/tokens, statistics on the key
  columns, one row group per series key;
  unsealed: raw pages, step statistics only);
* its rollups are published once per 1,000 steps (the buckets closed in them) and merged the same
  way: every closed bucket's row (min/max/mean/last, and where the min and max are) sits in the
  rollup file of the 1,000-step batch that closes it;
* the runs/attempts rows, and the query benchmark's BF16 branch run, go through the real ``StoreWriter``.

It is never compacted by hand. Values come from the same functions as the writer-path generators.
The reader cannot tell the difference except by file names and timestamps; ``generate`` reports
``layout: direct`` and BENCHMARKS.md says which way a store was made.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.bench_common import dir_bytes
from benchmarks.bench_query import (
    FANOUT,
    FLUSH_STEPS,
    LAYER_TYPES,
    METRICS,
    REF_RUN,
    RUN,
    SCALARS,
    TOKENS_PER_STEP,
    _flush_tables,
    _layer_values,
    _loss,
)
from healthwatch.store.segments import segment_name

SIZES = (100, 1000, 10_000)


def _strings(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value])).cast(pa.string())


def _rollup(values: np.ndarray, first: int, size: int, tps: int = TOKENS_PER_STEP) -> dict[str, np.ndarray]:
    """Closed ``size``-step buckets of a series that has a value at every step from ``first`` (a multiple of size)."""
    nb = values.size // size
    v = values[: nb * size].reshape(nb, size)
    b = np.arange(first // size, first // size + nb, dtype=np.int64)
    start = b * size
    amin, amax = v.argmin(axis=1), v.argmax(axis=1)
    return {"bucket_size": np.full(nb, size, dtype=np.int64), "bucket": b, "attempt": np.ones(nb, dtype=np.int32),
            "step_min": start, "step_max": start + size - 1, "tokens_min": (start + 1) * tps,
            "tokens_max": (start + size) * tps, "n": np.full(nb, size, dtype=np.int64),
            "vmin": v.min(axis=1), "vmax": v.max(axis=1), "vmean": v.mean(axis=1), "vlast": v[:, -1],
            "step_vmin": start + amin, "tokens_vmin": (start + amin + 1) * tps,
            "step_vmax": start + amax, "tokens_vmax": (start + amax + 1) * tps}


def tiered(units: int, rows_per_unit: int, fanout: int = FANOUT, seal_rows: int = 4_000_000) -> list[tuple[int, int, int]]:
    """``(first unit, end unit, level)`` of the files a tiered self-merging writer leaves after ``units``
    published segments of ``rows_per_unit`` rows: ``fanout`` segments of a level merge into one of
    the next until a segment holds ``seal_rows`` rows (sealed, never merged again)."""
    top = 0
    while fanout ** (top + 1) <= units and fanout**top * rows_per_unit < seal_rows:
        top += 1
    out, u = [], 0
    for lv in range(top, -1, -1):
        size = fanout**lv
        while units - u >= size:
            out.append((u, u + size, lv))
            u += size
    return out


#: Steps per published batch of rollup rows (the writer publishes closed buckets once per 1,000 steps).
ROLLUP_BATCH_STEPS = 1000


def write_layout(root: Path, run: str, table: str, steps: int, keys: list[Any], make: Any,
                 progress: Any = None, tokens_per_step: int = TOKENS_PER_STEP, seal_rows: int = 4_000_000) -> int:
    """Write ``table`` (``layer_stats`` or ``scalars``) of ``run`` and its rollups as the live writer leaves them.

    ``keys`` in sort order; ``make(key)`` returns ``(values over every step, columns)`` where a
    column is a constant (``str`` or ``int``) or an array over every step. Files are written by the
    writer's own :func:`healthwatch.store.merge.write_parquet` (sealed: key statistics, row groups cut at series keys;
    unsealed: raw pages, step statistics). Returns the files written.
    """
    import tempfile

    from healthwatch.schema import SORT_KEYS, TABLES
    from healthwatch.store.merge import write_parquet
    from healthwatch.store.segments import table_dir

    wid = f"a0001r00000x{uuid.uuid4().hex[:8]}"
    schema, rschema = TABLES[table], TABLES[f"{table}_rollup"]
    d, rd = table_dir(root, table, run), table_dir(root, f"{table}_rollup", run)
    d.mkdir(parents=True, exist_ok=True)
    rd.mkdir(parents=True, exist_ok=True)
    # Every key's values over every step, on disk (324 x 1M doubles do not belong in memory).
    mm_path = Path(tempfile.mkdtemp(prefix="hw-layout-")) / "values.f64"
    values = np.memmap(mm_path, dtype=np.float64, mode="w+", shape=(len(keys), steps))
    extras: list[dict[str, Any]] = []
    rolls: list[dict[str, np.ndarray]] = []
    for i, key in enumerate(keys):
        v, extra = make(key)
        values[i] = v
        extras.append(extra)
        rolls.append({str(size): _rollup(np.asarray(v), 0, size, tokens_per_step) for size in SIZES})
        if progress is not None:
            progress(i + 1, len(keys))
    all_steps = np.arange(steps, dtype=np.int64)
    tokens = (all_steps + 1) * tokens_per_step
    n_keys = len(keys)

    def column(name: str, get: Any, n: int) -> pa.Array:
        """A column over every key's slice (key-major): dictionary for strings, else plain."""
        vals = [get(e) for e in extras]
        if isinstance(vals[0], str):
            uniq = sorted(set(vals))
            codes = np.repeat(np.array([uniq.index(x) for x in vals], dtype=np.int32), n)
            return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(uniq, pa.string()))
        if isinstance(vals[0], np.ndarray):
            return pa.array(np.concatenate(vals))
        return pa.array(np.repeat(np.array(vals, dtype=np.int32), n))

    files = 0
    rows_per_flush = n_keys * FLUSH_STEPS
    for g0, g1, lv in tiered(steps // FLUSH_STEPS, rows_per_flush, FANOUT, seal_rows):
        a, b = g0 * FLUSH_STEPS, g1 * FLUSH_STEPS
        n = b - a
        cols: dict[str, pa.Array] = {
            "attempt": pa.array(np.ones(n * n_keys, dtype=np.int32)), "step": pa.array(np.tile(all_steps[a:b], n_keys)),
            "tokens": pa.array(np.tile(tokens[a:b], n_keys)), "value": pa.array(np.asarray(values[:, a:b]).reshape(-1)),
        }
        for c in extras[0]:
            cols[c] = column(c, (lambda e, c=c, a=a, b=b: e[c][a:b] if isinstance(e[c], np.ndarray) else e[c]), n)
        t = pa.table([cols[f.name] for f in schema], names=schema.names)
        tmp = d / f".tmp-{uuid.uuid4().hex}.partial"
        write_parquet(t, tmp, table, compress=t.num_rows >= seal_rows)
        tmp.rename(d / segment_name(wid, 2 * g1 - 1, lv, (a, b - 1)))  # the writer names its step range
        files += 1
    # Rollup rows: published once per ROLLUP_BATCH_STEPS (the buckets closed in it), merged tiered too.
    consts = [{c: v for c, v in e.items() if not isinstance(v, np.ndarray)} for e in extras]
    per_batch = sum(n_keys * ROLLUP_BATCH_STEPS // size for size in SIZES)
    order = [(c, "ascending") for c in SORT_KEYS[f"{table}_rollup"]]
    for u0, u1, lv in tiered(steps // ROLLUP_BATCH_STEPS, per_batch, FANOUT, seal_rows):
        a, b = u0 * ROLLUP_BATCH_STEPS, u1 * ROLLUP_BATCH_STEPS
        parts = []
        for k in range(n_keys):
            for size in SIZES:
                r = rolls[k][str(size)]
                sel = (r["step_max"] >= a) & (r["step_max"] < b)
                m = int(sel.sum())
                if m:
                    c2 = {c: pa.array(v[sel]) for c, v in r.items()}
                    c2.update({c: (_strings(v, m) if isinstance(v, str) else pa.array(np.full(m, v, dtype=np.int32)))
                               for c, v in consts[k].items()})
                    parts.append(pa.table({f.name: c2[f.name] for f in rschema}, schema=rschema))
        t = pa.concat_tables(parts).sort_by(order)
        tmp = rd / f".tmp-{uuid.uuid4().hex}.partial"
        write_parquet(t, tmp, f"{table}_rollup", compress=t.num_rows >= seal_rows)
        tmp.rename(rd / f"{wid}-{2 * u1 * (ROLLUP_BATCH_STEPS // FLUSH_STEPS):09d}-L{lv}.parquet")
        files += 1
    del values
    mm_path.unlink(missing_ok=True)
    mm_path.parent.rmdir()
    return files


def generate(root: Path, steps: int, layers: int = 108, seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """The query benchmark's live store (``bench_query``'s runs, metrics and values) in the self-merged
    layout; returns sizes."""
    import shutil

    import pyarrow.compute as pc

    from healthwatch.store import StoreWriter, attempt_row, init_store, run_row

    t0 = time.perf_counter()
    if steps % FLUSH_STEPS:
        raise ValueError(f"steps must be a multiple of {FLUSH_STEPS}, got {steps}")
    shutil.rmtree(root, ignore_errors=True)
    init_store(root)
    w = StoreWriter(root, RUN, merge_fanout=FANOUT)
    w.write("runs", run_row(precision="nvfp4"))
    w.write("attempts", attempt_row(attempt=1, start_step=0, host="bench"))
    all_steps = np.arange(steps, dtype=np.int64)

    def layer_key(key: tuple[str, int]) -> tuple[np.ndarray, dict[str, Any]]:
        metric, layer = key
        rng = np.random.default_rng((seed, METRICS.index(metric), layer))
        return (_layer_values(METRICS.index(metric), layer, all_steps, rng),
                {"layer": layer, "layer_type": LAYER_TYPES[layer % len(LAYER_TYPES)], "metric": metric})

    loss = _loss(all_steps, np.random.default_rng((seed, 99)))
    wall = 1.7e9 + all_steps.astype(np.float64)

    def scalar_key(name: str) -> tuple[np.ndarray, dict[str, Any]]:
        return loss * (1.0 + 0.05 * SCALARS.index(name)), {"name": name, "wall_time": wall}

    write_layout(root, RUN, "layer_stats", steps, [(m, lay) for m in sorted(METRICS) for lay in range(layers)],
                 layer_key, progress)
    write_layout(root, RUN, "scalars", steps, sorted(SCALARS), scalar_key)
    # The BF16 branch run, through the real writer (its scalars only, a tenth of the steps from the middle).
    ref_first, ref_steps = steps // 2, max(1_000, steps // 10)
    ref = StoreWriter(root, REF_RUN, merge_fanout=FANOUT)
    ref.write("runs", run_row(parent=RUN, branch_step=ref_first, precision="bf16"))
    ref.write("attempts", attempt_row(attempt=1, start_step=ref_first, host="bench"))
    for a in range(ref_first, ref_first + ref_steps, FLUSH_STEPS):
        _ls, sc = _flush_tables(a, min(ref_first + ref_steps, a + FLUSH_STEPS), 1, seed + 1)
        sc = sc.set_column(sc.schema.get_field_index("tokens"), "tokens", pc.add(sc["tokens"], TOKENS_PER_STEP // 3))
        sc = sc.set_column(sc.schema.get_field_index("value"), "value", pc.multiply(sc["value"], 0.997))
        ref.write("scalars", sc)
        ref.compact_own("scalars")
    files = sum(1 for _ in (root / "table=layer_stats" / f"run={RUN}").glob("*.parquet"))
    return {"steps": steps, "layers": layers, "rows": steps * (layers * len(METRICS) + len(SCALARS)),
            "layer_rows": steps * layers * len(METRICS), "segments": files, "flushes": steps // FLUSH_STEPS,
            "ref_steps": ref_steps, "bytes": dir_bytes(root), "gen_s": time.perf_counter() - t0,
            "layout": "direct", "levels": [lv for _a, _b, lv in tiered(steps // FLUSH_STEPS, layers * len(METRICS) * FLUSH_STEPS)]}


def generate_synth(root: Path, steps: int, layers: int = 108, seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """The render benchmark's store (``benchmarks.synth_store``'s run, metrics, scalars, events, expert
    load and alerts) with ``layer_stats``/``scalars`` in the self-merged layout; the rest through
    the real writer, as ``synth_store.generate`` writes it."""
    import shutil

    from benchmarks import synth_store as ss
    from healthwatch.store import StoreWriter, attempt_row, init_store, run_row

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    init_store(root)
    run, tps = "synth", 4_194_304
    w = StoreWriter(root, run, attempt=1)
    now = time.time()
    w.write("runs", run_row(precision="nvfp4", config={"synthetic": True, "layers": layers}, created=now))
    w.write("attempts", attempt_row(attempt=1, start_step=0, started_at=now, host="synth", reason="start"))
    types = ss.layer_types(layers)
    all_steps = np.arange(steps, dtype=np.int64)
    spike = int(steps * 0.777)
    keys = [(m, lay) for m in sorted(ss.DEFAULT_METRICS) for lay in range(layers)]

    def layer_key(key: tuple[str, int]) -> tuple[np.ndarray, dict[str, Any]]:
        m, lay = key
        rng = np.random.default_rng((seed, keys.index(key)))
        return (ss._layer_values(m, lay, layers, all_steps, rng, spike),
                {"layer": lay, "layer_type": types[lay], "metric": m})

    wall = 1.7e9 + all_steps * 2.0

    def scalar_key(name: str) -> tuple[np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng((seed + 1, sorted(ss.DEFAULT_SCALARS).index(name)))
        return ss._scalar_values(name, all_steps, steps, rng), {"name": name, "wall_time": wall}

    write_layout(root, run, "layer_stats", steps, keys, layer_key, progress, tokens_per_step=tps)
    write_layout(root, run, "scalars", steps, sorted(ss.DEFAULT_SCALARS), scalar_key, tokens_per_step=tps)
    ck = np.arange(0, steps, max(1, steps // 100), dtype=np.int64)
    w.write("events", {"attempt": np.ones(ck.size, dtype=np.int32), "step": ck, "tokens": (ck + 1) * tps,
                       "kind": ["checkpoint"] * ck.size, "message": ["synthetic checkpoint"] * ck.size,
                       "wall_time": 1.7e9 + ck * 2.0})
    moe = [i for i, t in enumerate(types) if t == "moe"][:8]
    if moe:
        es = np.arange(0, steps, 1000, dtype=np.int64)
        counts = np.random.default_rng(seed + 2).poisson(1000, size=(es.size * len(moe), 64)).astype(np.int64)
        w.write("expert_load", {"attempt": np.ones(es.size * len(moe), dtype=np.int32),
                                "step": np.tile(es, len(moe)), "tokens": np.tile((es + 1) * tps, len(moe)),
                                "layer": np.repeat(np.array(moe, dtype=np.int32), es.size),
                                "counts": pa.array(list(counts), type=pa.list_(pa.int64()))})
    w.write("alerts", {"alert": ["LossSpike", "LossSpike"], "group": ["loss"] * 2, "state": ["firing", "resolved"],
                       "severity": ["critical"] * 2, "step": [spike, spike + 50],
                       "tokens": [(spike + 1) * tps, (spike + 51) * tps], "layer": [None, None], "value": [5.0, 2.0],
                       "labels": ["{}"] * 2, "annotations": ["{}"] * 2, "fingerprint": ["synth-loss-spike"] * 2,
                       "evaluator": ["synth"] * 2, "wall_time": [now, now + 1]})
    return {"layer_rows": steps * len(keys), "scalar_rows": steps * len(ss.DEFAULT_SCALARS),
            "write_s": time.perf_counter() - t0, "compact_s": 0.0, "layout": "direct"}


def name_step_ranges(root: Path) -> int:
    """Rename the segments of a store built before segment names carried their step range
    (:func:`healthwatch.store.segments.segment_name`) to the names today's writer gives them.

    The range comes from the ``step`` column's footer statistics, or from the column itself when a
    row group has none; rollup tables (no ``step`` column) and names that already carry a range are
    left as they are. Meant for a benchmark copy (``cp -al``) of a store no writer is using: the
    benchmark numbers then describe the layout a writer of this commit leaves. Returns files renamed.
    """
    import pyarrow.parquet as pq

    from healthwatch.store.segments import list_segments, parse_segment

    renamed = 0
    for tdir in sorted(root.glob("table=*")):
        for rdir in sorted(tdir.glob("run=*")):
            for path in list_segments(rdir):
                seg = parse_segment(path)
                if not seg.writer or seg.steps is not None:
                    continue
                meta = pq.read_metadata(path)
                names = [meta.schema.column(i).name for i in range(meta.num_columns)]
                if "step" not in names or meta.num_rows == 0:
                    continue
                i = names.index("step")
                stats = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
                if all(s is not None and s.has_min_max and not s.null_count for s in stats):
                    rng = (min(int(s.min) for s in stats), max(int(s.max) for s in stats))
                else:
                    col = pq.read_table(path, columns=["step"]).column(0).to_numpy()
                    rng = (int(col.min()), int(col.max()))
                path.rename(rdir / segment_name(seg.writer, seg.seq, seg.level, rng))
                renamed += 1
    return renamed
