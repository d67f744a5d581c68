"""The Monitor's own CPU time per training step, attributed entry point by entry point, for a
code version given on the command line: the tool behind "today's figure" in BENCHMARKS.md section 1.

It runs on the present tree and on an old checkout alike (it uses only ``Monitor``, ``watch``,
``after_backward``, ``step`` and, where they exist, ``MonitorConfig(signals=...)`` and
``clip_grad_norm_``), so that the hook-overhead figure of one commit can be set beside another's
on the same machine, in alternating processes::

    python benchmarks/overhead_attribution.py nvfp4 all 12            # this tree
    OLD_TREE=/tmp/old python benchmarks/overhead_attribution.py nvfp4 five 12   # a checkout
    git worktree add /tmp/f8549be f8549be   # the baseline file bench_overhead reads:
    OLD_TREE=/tmp/f8549be python benchmarks/overhead_attribution.py baseline \
        benchmarks/results/overhead-baseline-f8549be.json 3 12

Two copies of the benchmark model (:data:`benchmarks.bench_overhead.MODEL`, same weights, same
batches, batch 2 x 128, one torch thread) train in one process, one step each per round: ``none``
(no Monitor) and the variant (``five``: the report's five signals; ``all``: every family at every
step). Both clip gradients at 1.0 as the reference trainer (``healthwatch.demo.trainer``) does:
``none`` with ``torch.nn.utils.clip_grad_norm_``, the variant with the Monitor's
``clip_grad_norm_`` when it has one (else ``after_backward()`` and torch's function). Timed on the
training thread's CPU clock (``time.thread_time_ns``): the Monitor's forward hooks on blocks and
routers (bracketed by hooks of our own, their cost subtracted), its quantisation observers and
Mamba dt hooks, the gradient pass (the shared clip minus the same round's torch clip, or
``after_backward()``; the torch clip subtracted is the median over the run's no-Monitor steps),
the optimizer post-step hook, and ``step()`` with the flushes that fall
in it. The writer thread's CPU time is reported apart. Prints one JSON line last.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import threading
import time

if os.environ.get("OLD_TREE"):
    # Import healthwatch from an old checkout: drop the editable install's finder and put a
    # package directory laid out as pyproject's package-dir maps it first on the path.
    import re
    import shutil

    tree = os.environ["OLD_TREE"]
    pkg_root = os.path.join(tempfile.mkdtemp(), "pkg")
    shutil.copytree(os.path.join(tree, "healthwatch"), os.path.join(pkg_root, "healthwatch"), symlinks=True)
    text = open(os.path.join(tree, "pyproject.toml")).read()
    for sub, path in re.findall(r'^"healthwatch\.(\w+)" = "([^"]+)"', text, flags=re.M):
        os.symlink(os.path.join(tree, path), os.path.join(pkg_root, "healthwatch", sub))
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
    sys.path.insert(0, pkg_root)

# This tree's benchmark package (appended: an OLD_TREE's healthwatch, first on the path, still wins).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import healthwatch as hw  # noqa: E402
from benchmarks.bench_common import thread_cpu_seconds  # noqa: E402
from benchmarks.bench_overhead import MODEL, OUTSIDE_METHODS  # noqa: E402
from healthwatch.demo.data import SyntheticTokens  # noqa: E402
from healthwatch.demo.model import HybridConfig, HybridLM  # noqa: E402

FAMILIES = ("quant", "router", "mamba", "update")


def main(precision: str, variant: str, rounds: int, batch: int = 2, clip: float = 1.0) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = HybridConfig(**dict(MODEL, precision=precision))
    base = HybridLM(cfg)
    data = SyntheticTokens(cfg.vocab_size, 128, batch, seed=0)
    models = {"none": copy.deepcopy(base), variant: copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    kw: dict = {}
    has_signals = "signals" in getattr(hw.MonitorConfig, "__dataclass_fields__", {})
    if variant == "all":
        kw["monitor_config"] = hw.MonitorConfig(signals=FAMILIES, signals_every=1)
    elif has_signals:
        kw["monitor_config"] = hw.MonitorConfig(signals=())
    mon = hw.Monitor(store=tempfile.mkdtemp(), run=variant, precision=precision, log_every=1, expert_load_every=1,
                     **kw)
    spec = mon.watch(models[variant])
    # SHARED_CLIP=0: the variant calls after_backward() and clips with torch, as a trainer that does
    # not use the Monitor's clip_grad_norm_ (and as every version before it).
    shared_clip = callable(getattr(mon, "clip_grad_norm_", None)) and os.environ.get("SHARED_CLIP", "1") != "0"
    col = mon._collector
    parts: dict[str, int] = {}

    def add(k: str, ns: int) -> None:
        parts[k] = parts.get(k, 0) + ns

    for meth in OUTSIDE_METHODS:
        if hasattr(col, meth):
            orig = getattr(col, meth)

            def timed(*a, __o=orig, __m=meth, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
                c0 = time.thread_time_ns()
                try:
                    return __o(*a, **k)
                finally:
                    add(__m, time.thread_time_ns() - c0)

            setattr(col, meth, timed)
    starts: dict[int, int] = {}
    kind = {id(b.module): "hooks: blocks" for b in spec.blocks if b.residual}
    kind.update({id(r.module): "hooks: routers" for r in spec.routers})

    def pre(mod, _i, _o) -> None:  # noqa: ANN001
        starts[id(mod)] = time.thread_time_ns()

    def post(mod, _i, _o) -> None:  # noqa: ANN001
        t = starts.pop(id(mod), None)
        if t is not None:
            add(kind[id(mod)], time.thread_time_ns() - t - bracket[0])

    # What the bracket itself adds: the pre -> post gap on a module with no other hook, subtracted.
    bracket = [0]
    probe = torch.nn.Identity()
    probe.register_forward_hook(pre, prepend=True)
    probe.register_forward_hook(post)
    kind[id(probe)] = "probe"
    z = torch.zeros(1)
    for _ in range(200):
        probe(z)
    parts.clear()
    for _ in range(2000):
        probe(z)
    bracket[0] = parts.pop("probe", 0) // 2000
    parts.clear()
    by_mod = {id(m): m for m in (b.module for b in spec.blocks if b.residual)}
    by_mod.update({id(r.module): r.module for r in spec.routers})
    for m in by_mod.values():
        m.register_forward_hook(pre, prepend=True)
        m.register_forward_hook(post)

    rows: list[dict] = []
    step_cpu: dict[str, list[float]] = {"none": [], variant: []}
    writer = next((t for t in threading.enumerate() if t.name.startswith("healthwatch-writer")), None)

    def one(name: str, i: int) -> int:
        m, opt = models[name], opts[name]
        ids = data.batch_at(i)
        c_step = time.thread_time_ns()
        out = m(ids)
        out.total_loss.backward()
        c = time.thread_time_ns()
        if name == "none":
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            clip_ns = time.thread_time_ns() - c
        elif shared_clip:
            mon.clip_grad_norm_(m.parameters(), clip)
            clip_ns = time.thread_time_ns() - c
        else:
            mon.after_backward()
            add("after_backward", time.thread_time_ns() - c)
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            clip_ns = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if name != "none":
            c = time.thread_time_ns()
            mon.step(i, tokens=(i + 1) * batch * 128, loss=out.loss, mtp_losses=out.mtp_losses, lr=1e-3)
            add("step", time.thread_time_ns() - c)
        step_cpu[name].append((time.thread_time_ns() - c_step) / 1e6)
        return clip_ns

    def writer_cpu() -> float | None:
        return thread_cpu_seconds(writer) if writer is not None else None

    warm = 3
    w0 = None
    clips: list[dict[str, int]] = []
    for i in range(warm + rounds):
        if i == warm:
            w0 = writer_cpu()
        parts.clear()
        order = ["none", variant] if i % 2 == 0 else [variant, "none"]
        clip_ns = {n: one(n, i) for n in order}
        if i >= warm:
            rows.append(dict(parts))
            clips.append(clip_ns)
    mon.flush(wait=True)
    w1 = writer_cpu()
    w_cpu = (w1 - w0) / rounds * 1e3 if (w0 is not None and w1 is not None) else None
    mon.close()

    def med(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else float("nan")

    if shared_clip:
        # The Monitor's share of the shared clip: each step's clip minus the median torch clip of the
        # no-Monitor copy (a step-by-step difference of two ~18 ms figures would add their noise).
        torch_clip = sorted(c["none"] for c in clips)[len(clips) // 2]
        for r, c in zip(rows, clips):
            r["gradient pass (shared clip - torch clip)"] = c[variant] - torch_clip
    keys = sorted({k for r in rows for k in r})
    per_part = {k: med([r.get(k, 0) / 1e6 for r in rows]) for k in keys}
    totals = [sum(r.values()) / 1e6 for r in rows]
    none_step = med(step_cpu["none"][warm:])
    res = {
        "precision": precision, "variant": variant, "rounds": rounds, "batch": batch,
        "shared_clip": shared_clip, "none_step_cpu_ms": none_step,
        "variant_step_cpu_ms": med(step_cpu[variant][warm:]),
        "monitor_ms": med(totals), "monitor_pct": 100 * med(totals) / none_step,
        "parts_ms": per_part, "writer_cpu_ms_per_step": w_cpu, "bracket_ns": bracket[0], "load_average": list(os.getloadavg()),
    }
    print(f"{precision} {variant}: no-Monitor step {none_step:.1f} ms CPU; Monitor {res['monitor_ms']:.2f} ms "
          f"= {res['monitor_pct']:.2f} % (median of {rounds} steps); writer thread {w_cpu or 0:.2f} ms/step")
    for k, v in per_part.items():
        print(f"    {k:42s} {v:8.3f} ms")
    return res


def baseline(out_path: str, runs: int, rounds: int, variant: str = "five") -> dict:
    """Measure ``variant`` ``runs`` times per precision, each in a fresh process of this script (the
    tree given by ``OLD_TREE`` when set), and write the medians: the file bench_overhead reads as
    "today's figure" (:data:`benchmarks.bench_overhead.BASELINE`)."""
    import subprocess

    found: dict[str, list[dict]] = {"nvfp4": [], "bf16": []}
    for _ in range(runs):
        for precision in found:
            proc = subprocess.run([sys.executable, __file__, precision, variant, str(rounds)], check=True,
                                  capture_output=True, text=True, env=os.environ.copy())
            found[precision].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(proc.stdout.strip().splitlines()[0], flush=True)
    out: dict = {"tree": os.environ.get("OLD_TREE", "."), "variant": variant, "rounds": rounds, "runs": runs}
    for precision, got in found.items():
        pcts = sorted(g["monitor_pct"] for g in got)
        out[precision] = {"monitor_pct": pcts[len(pcts) // 2], "runs": [
            {k: g[k] for k in ("monitor_pct", "monitor_ms", "none_step_cpu_ms", "parts_ms", "load_average")}
            for g in got]}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "baseline":  # baseline OUT.json RUNS ROUNDS [VARIANT]
        baseline(args[1], int(args[2]), int(args[3]), *args[4:5])
    else:  # PRECISION VARIANT ROUNDS [BATCH]
        print(json.dumps(main(args[0], args[1], int(args[2]), *(int(a) for a in args[3:4]))))
