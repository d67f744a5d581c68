"""Fast, vectorised generator of a large synthetic healthwatch store (for the app benchmarks).

Writes a run of ``--steps`` steps x ``--layers`` layers x per-layer metrics (default 1M x 108 x
``maxvio``/``resid_rms``/``wgrad_norm``, i.e. 324M layer rows) plus the usual scalars, events
and a few alert transitions, through the Monitor's writer path: one flush of 100 steps at a time
with :meth:`StoreWriter.write` (which keeps the 100/1,000/10,000-step rollups current) and
:meth:`StoreWriter.compact_own` (the writer's self-merge), exactly the calls of the Monitor's
writer thread. The store is never compacted by hand (``--compact`` does it, for comparison).

Values are generated 10,000 steps at a time (bounded memory) as float32 and widened: realistic
precision and much better compression than 53 random bits.

Usage::

    python -m benchmarks.synth_store --root /tmp/hw-synth --steps 1000000 --layers 108
    python -m benchmarks.synth_store --root /tmp/hw-small --steps 20000 --layers 24   # quick
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from healthwatch.schema import TABLES
from healthwatch.store import StoreWriter, attempt_row, compact_store, init_store, run_row

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


#: Steps per flush of the synthetic writer (a Monitor flushing every 100 steps).
FLUSH_STEPS = 100
#: Steps whose values are generated at once (then cut into flushes): bounded memory at any size.
CHUNK_STEPS = 10_000


def _scalar_values(name: str, step: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    t = step / max(1, steps - 1)
    noise = rng.standard_normal(step.size).astype(np.float32)
    base = 2.0 + 3.0 * np.exp(-t * 30) - 0.3 * t
    if name.startswith("loss/"):
        offset = 0.0 if name == "loss/train" else 0.08 * int(name.rsplit("_", 1)[-1])
        v = base + offset + 0.02 * noise
    elif name == "lr":
        v = 3e-4 * np.minimum(1.0, (step + 1) / 2000) * (0.1 + 0.9 * (1 - t))
    else:
        v = 0.3 * (1 + 3 * np.exp(-t * 20)) * np.exp(0.1 * noise)
    if name == "loss/train":
        spike = int(steps * 0.777)
        v = np.where(step == spike, v + 3.0, v)  # a one-step loss spike that must survive downsampling
    return v.astype(np.float32).astype(np.float64)


def write_live(w: StoreWriter, steps: int, layers: int, metrics: tuple[str, ...], scalars: tuple[str, ...],
               tokens_per_step: int, seed: int, moe_only_maxvio: bool) -> dict[str, float]:
    """Write ``steps`` steps through ``w`` one flush at a time, as the Monitor's writer thread does:
    ``write`` (which keeps the rollups current) then ``compact_own`` (self-merge) per flush.

    Returns row counts and the wall/CPU time spent in the writer calls only.
    """
    types = layer_types(layers)
    keys = [(m, lay) for m in sorted(metrics) for lay in range(layers)
            if not (moe_only_maxvio and m == "maxvio" and types[lay] != "moe")]
    spike_step = int(steps * 0.777)
    rngs = {k: np.random.default_rng((seed, i)) for i, k in enumerate(keys)}
    srngs = {n: np.random.default_rng((seed + 1, i)) for i, n in enumerate(sorted(scalars))}
    k_metric = np.array([m for m, _ in keys], dtype=object)
    k_layer = np.array([lay for _, lay in keys], dtype=np.int32)
    k_type = np.array([types[lay] for _, lay in keys], dtype=object)
    names = np.array(sorted(scalars), dtype=object)
    layer_rows = scalar_rows = 0
    wall = cpu = 0.0
    for c0 in range(0, steps, CHUNK_STEPS):
        chunk = np.arange(c0, min(steps, c0 + CHUNK_STEPS), dtype=np.int64)
        vals = np.stack([_layer_values(m, lay, layers, chunk, rngs[(m, lay)], spike_step) for m, lay in keys], axis=1)
        svals = np.stack([_scalar_values(n, chunk, steps, srngs[n]) for n in names], axis=1)
        for f0 in range(0, chunk.size, FLUSH_STEPS):
            st = chunk[f0:f0 + FLUSH_STEPS]
            n, k = st.size, len(keys)
            ls = pa.Table.from_arrays([
                pa.array(np.ones(n * k, dtype=np.int32)), pa.array(np.repeat(st, k)),
                pa.array(np.repeat((st + 1) * tokens_per_step, k)), pa.array(np.tile(k_layer, n)),
                pa.array(np.tile(k_type, n), pa.string()), pa.array(np.tile(k_metric, n), pa.string()),
                pa.array(vals[f0:f0 + n].reshape(-1)),
            ], schema=TABLES["layer_stats"])
            ns = len(names)
            sc = pa.Table.from_arrays([
                pa.array(np.ones(n * ns, dtype=np.int32)), pa.array(np.repeat(st, ns)),
                pa.array(np.repeat((st + 1) * tokens_per_step, ns)), pa.array(np.tile(names, n), pa.string()),
                pa.array(svals[f0:f0 + n].reshape(-1)), pa.array(np.repeat(1.7e9 + st * 2.0, ns)),
            ], schema=TABLES["scalars"])
            t0, p0 = time.perf_counter(), time.process_time()
            w.write("layer_stats", ls)
            w.write("scalars", sc)
            w.compact_own("layer_stats")
            w.compact_own("scalars")
            wall += time.perf_counter() - t0
            cpu += time.process_time() - p0
            layer_rows += ls.num_rows
            scalar_rows += sc.num_rows
    return {"layer_rows": layer_rows, "scalar_rows": scalar_rows, "ingest_wall_s": wall, "ingest_cpu_s": cpu}


def generate(root: Path, run: str = "synth", steps: int = 1_000_000, layers: int = 108,
             metrics: tuple[str, ...] = DEFAULT_METRICS, scalars: tuple[str, ...] = DEFAULT_SCALARS,
             tokens_per_step: int = 4_194_304, seed: int = 0, moe_only_maxvio: bool = False,
             compact: bool = False) -> dict[str, float]:
    """Write a synthetic run into ``root`` through the writer path (live rollups and self-merges,
    never compacted unless ``compact``); returns timings and row counts."""
    t0 = time.perf_counter()
    init_store(root)
    w = StoreWriter(root, run, attempt=1)
    now = time.time()
    w.write("runs", run_row(precision="nvfp4", config={"synthetic": True, "layers": layers}, created=now))
    w.write("attempts", attempt_row(attempt=1, start_step=0, started_at=now, host="synth", reason="start"))
    ingest = write_live(w, steps, layers, metrics, scalars, tokens_per_step, seed, moe_only_maxvio)
    layer_rows, scalar_rows = ingest["layer_rows"], ingest["scalar_rows"]
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
    return {"layer_rows": layer_rows, "scalar_rows": scalar_rows, "write_s": t1 - t0, "compact_s": t2 - t1,
            "ingest_wall_s": ingest["ingest_wall_s"], "ingest_cpu_s": ingest["ingest_cpu_s"]}


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
    ap.add_argument("--compact", action="store_true", help="compact by hand afterwards (not needed: rollups are live)")
    args = ap.parse_args(argv)
    res = generate(args.root, args.run, args.steps, args.layers, tuple(m for m in args.metrics.split(",") if m),
                   tokens_per_step=args.tokens_per_step, seed=args.seed, moe_only_maxvio=args.moe_only_maxvio,
                   compact=args.compact)
    rate = (res["layer_rows"] + res["scalar_rows"]) / max(res["write_s"], 1e-9)
    print(f"{args.root}: {res['layer_rows']:,} layer rows + {res['scalar_rows']:,} scalar rows written in "
          f"{res['write_s']:.1f} s ({rate / 1e6:.1f} M rows/s), compaction + rollups {res['compact_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
