"""Fast, vectorised generator of a large synthetic healthwatch store (for the app benchmarks).

Writes a run of ``--steps`` steps x ``--layers`` layers x per-layer metrics (default 1M x 108 x
``maxvio``/``resid_rms``/``wgrad_norm``, i.e. 324M layer rows) plus the usual scalars, events
and a few alert transitions into the store's real layout (``table=<t>/run=<r>/*.parquet``), then
runs :func:`healthwatch.store.compact_store` so the rollups exist, as they would on a compacted
production store.

Rows are generated per (metric, layer) block and streamed into one Parquet file per table in
the compaction sort order (metric, layer, step), so nothing larger than one block is held in
memory and compaction has nothing to merge (it only writes the rollups). Values are drawn as
float32 and widened: realistic precision and much better compression than 53 random bits.

Usage::

    python -m benchmarks.synth_store --root /tmp/hw-synth --steps 1000000 --layers 108
    python -m benchmarks.synth_store --root /tmp/hw-small --steps 20000 --layers 24   # quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from healthwatch.schema import TABLES
from healthwatch.store.segments import table_dir
from healthwatch.store import StoreWriter, compact_store, init_store

DEFAULT_METRICS = ("maxvio", "resid_rms", "wgrad_norm")
DEFAULT_SCALARS = (
    "loss/train", "loss/mtp_1", "loss/mtp_2",
    "grad_norm/total", "grad_norm/output", "grad_norm/embedding", "grad_norm/mtp", "lr",
)
# A Nemotron-H-like hybrid pattern: mostly Mamba-2 and MoE blocks, an attention block now and then.
PATTERN = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEME"
TYPE_OF = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
ROW_GROUP = 122_880


def layer_types(layers: int) -> list[str]:
    """Layer types of a ``layers``-deep hybrid stack (the last layer is the MTP block)."""
    types = [TYPE_OF[PATTERN[i % len(PATTERN)]] for i in range(layers)]
    if layers > 1:
        types[-1] = "mtp"
    return types


def _layer_values(metric: str, layer: int, layers: int, steps: np.ndarray, rng: np.random.Generator,
                  spike_step: int) -> np.ndarray:
    """Plausible values of one layer metric over ``steps`` (float32 precision), with one spike."""
    n = steps.size
    t = steps.astype(np.float32) / max(1.0, float(steps[-1]) if n else 1.0)
    noise = rng.standard_normal(n, dtype=np.float32)
    if metric == "maxvio":
        v = np.exp(np.float32(0.18) + np.float32(0.25) * noise) * (np.float32(1.0) + np.float32(0.3) * t)
    elif metric == "resid_rms":
        depth = np.float32(1.0 + 3.0 * layer / max(1, layers - 1))
        v = depth * (np.float32(1.0) + np.float32(0.5) * t) * (np.float32(1.0) + np.float32(0.01) * noise)
    elif metric == "wgrad_norm":
        v = np.float32(0.05) * (np.float32(1.0) + np.float32(4.0) * np.exp(-t * 20)) * np.exp(np.float32(0.1) * noise)
    else:
        v = np.float32(1.0) + np.float32(0.1) * noise
    if layer == 3 and n and steps[0] <= spike_step <= steps[-1]:
        # One single-step spike in an early layer: min/max downsampling must keep it visible.
        v[spike_step - steps[0]] *= np.float32(40.0)
    return v.astype(np.float64)


def write_layer_stats(root: Path, run: str, steps: int, layers: int, metrics: tuple[str, ...],
                      tokens_per_step: int, seed: int, moe_only_maxvio: bool) -> int:
    """Stream the layer_stats table of ``run`` into one sorted segment; returns the row count."""
    schema = TABLES["layer_stats"]
    directory = table_dir(root, "layer_stats", run)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".tmp-synth.partial"
    step = np.arange(steps, dtype=np.int64)
    tokens = (step + 1) * tokens_per_step
    step_a, tokens_a = pa.array(step), pa.array(tokens)
    attempt_a = pa.repeat(pa.scalar(1, pa.int32()), steps)
    types = layer_types(layers)
    rng = np.random.default_rng(seed)
    rows = 0
    spike_step = int(steps * 0.777)
    with pq.ParquetWriter(tmp, schema, compression="zstd") as out:
        for metric in sorted(metrics):
            metric_a = pa.repeat(pa.scalar(metric), steps)
            for layer in range(layers):
                if moe_only_maxvio and metric == "maxvio" and types[layer] != "moe":
                    continue
                table = pa.Table.from_arrays(
                    [attempt_a, step_a, tokens_a, pa.repeat(pa.scalar(layer, pa.int32()), steps),
                     pa.repeat(pa.scalar(types[layer]), steps), metric_a,
                     pa.array(_layer_values(metric, layer, layers, step, rng, spike_step))],
                    schema=schema,
                )
                out.write_table(table, row_group_size=ROW_GROUP)
                rows += steps
    tmp.rename(directory / f"synth{seed:08d}-{int(time.time()):012d}-L99.parquet")
    return rows


def write_scalars(root: Path, run: str, steps: int, names: tuple[str, ...], tokens_per_step: int, seed: int) -> int:
    """Stream the scalars table of ``run`` into one sorted segment; returns the row count."""
    schema = TABLES["scalars"]
    directory = table_dir(root, "scalars", run)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".tmp-synth.partial"
    step = np.arange(steps, dtype=np.int64)
    t = step / max(1, steps - 1)
    rng = np.random.default_rng(seed + 1)
    base = 2.0 + 3.0 * np.exp(-t * 30) - 0.3 * t
    wall = 1.7e9 + step * 2.0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as out:
        for name in sorted(names):
            noise = rng.standard_normal(steps).astype(np.float32)
            if name.startswith("loss/"):
                offset = 0.0 if name == "loss/train" else 0.08 * int(name.rsplit("_", 1)[-1])
                v = base + offset + 0.02 * noise
            elif name == "lr":
                v = 3e-4 * np.minimum(1.0, (step + 1) / 2000) * (0.1 + 0.9 * (1 - t))
            else:
                v = 0.3 * (1 + 3 * np.exp(-t * 20)) * np.exp(0.1 * noise)
            if name == "loss/train":
                v[int(steps * 0.777)] += 3.0  # a one-step loss spike that must survive downsampling
            table = pa.Table.from_arrays(
                [pa.repeat(pa.scalar(1, pa.int32()), steps), pa.array(step), pa.array((step + 1) * tokens_per_step),
                 pa.repeat(pa.scalar(name), steps), pa.array(v.astype(np.float32).astype(np.float64)), pa.array(wall)],
                schema=schema,
            )
            out.write_table(table, row_group_size=ROW_GROUP)
    tmp.rename(directory / f"synth{seed:08d}-{int(time.time()):012d}-L99.parquet")
    return steps * len(names)


def generate(root: Path, run: str = "synth", steps: int = 1_000_000, layers: int = 108,
             metrics: tuple[str, ...] = DEFAULT_METRICS, scalars: tuple[str, ...] = DEFAULT_SCALARS,
             tokens_per_step: int = 4_194_304, seed: int = 0, moe_only_maxvio: bool = False,
             compact: bool = True) -> dict[str, float]:
    """Write a synthetic run into ``root`` and (by default) compact it; returns timings and row counts."""
    t0 = time.perf_counter()
    init_store(root)
    w = StoreWriter(root, run, attempt=1)
    now = time.time()
    w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["nvfp4"],
                     "config": [json.dumps({"synthetic": True, "layers": layers})], "created": [now],
                     "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [1], "start_step": [0], "started_at": [now], "host": ["synth"],
                         "reason": ["start"], "schema_version": ["1.0"]})
    layer_rows = write_layer_stats(root, run, steps, layers, metrics, tokens_per_step, seed, moe_only_maxvio)
    scalar_rows = write_scalars(root, run, steps, scalars, tokens_per_step, seed)
    ck = np.arange(0, steps, max(1, steps // 100), dtype=np.int64)
    w.write("events", {"attempt": np.ones(ck.size, dtype=np.int32), "step": ck, "tokens": (ck + 1) * tokens_per_step,
                       "kind": ["checkpoint"] * ck.size, "message": ["synthetic checkpoint"] * ck.size,
                       "wall_time": 1.7e9 + ck * 2.0})
    types = layer_types(layers)
    moe = [i for i, t in enumerate(types) if t == "moe"][:8]
    if moe:
        # Expert-load vectors every 1,000 steps for a few MoE layers (64 experts).
        es = np.arange(0, steps, 1000, dtype=np.int64)
        rng = np.random.default_rng(seed + 2)
        counts = rng.poisson(1000, size=(es.size * len(moe), 64)).astype(np.int64)
        w.write("expert_load", {"attempt": np.ones(es.size * len(moe), dtype=np.int32),
                                "step": np.tile(es, len(moe)), "tokens": np.tile((es + 1) * tokens_per_step, len(moe)),
                                "layer": np.repeat(np.array(moe, dtype=np.int32), es.size),
                                "counts": pa.array(list(counts), type=pa.list_(pa.int64()))})
    spike = int(steps * 0.777)
    w.write("alerts", {"alert": ["LossSpike", "LossSpike"], "group": ["loss"] * 2, "state": ["firing", "resolved"],
                       "severity": ["critical"] * 2, "step": [spike, spike + 50],
                       "tokens": [(spike + 1) * tokens_per_step, (spike + 51) * tokens_per_step],
                       "layer": [None, None], "value": [5.0, 2.0], "labels": ["{}"] * 2, "annotations": ["{}"] * 2,
                       "fingerprint": ["synth-loss-spike"] * 2, "evaluator": ["synth"] * 2,
                       "wall_time": [now, now + 1]})
    t1 = time.perf_counter()
    if compact:
        compact_store(root)
    t2 = time.perf_counter()
    return {"layer_rows": layer_rows, "scalar_rows": scalar_rows, "write_s": t1 - t0, "compact_s": t2 - t1}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="store directory to create or extend")
    ap.add_argument("--run", default="synth")
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=108)
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated layer metrics")
    ap.add_argument("--tokens-per-step", type=int, default=4_194_304)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moe-only-maxvio", action="store_true", help="MaxVio only on MoE layers (realistic)")
    ap.add_argument("--no-compact", action="store_true", help="skip compaction (no rollups)")
    args = ap.parse_args(argv)
    res = generate(args.root, args.run, args.steps, args.layers, tuple(m for m in args.metrics.split(",") if m),
                   tokens_per_step=args.tokens_per_step, seed=args.seed, moe_only_maxvio=args.moe_only_maxvio,
                   compact=not args.no_compact)
    rate = (res["layer_rows"] + res["scalar_rows"]) / max(res["write_s"], 1e-9)
    print(f"{args.root}: {res['layer_rows']:,} layer rows + {res['scalar_rows']:,} scalar rows written in "
          f"{res['write_s']:.1f} s ({rate / 1e6:.1f} M rows/s), compaction + rollups {res['compact_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
