"""Benchmark 1: hook overhead of the Monitor on the reference trainer, per signal family, and host syncs.

Identical copies of the reference model (:class:`healthwatch.demo.model.HybridLM`, same initial
weights, same batches) train side by side in one process, one per variant: no Monitor; the
report's five signals only; five + each new family alone (quant, router, mamba, update), every
step; every family every step; and ``MonitorConfig()`` as shipped. Each round runs one step of
every variant in a rotated order (a Latin square over rounds), so drift (thermal, other tenants)
and ordering effects cancel; each variant's overhead is the median of its paired differences to
the no-Monitor step of the same round (and to the five-signal step, in percentage points of the
no-Monitor step), with a bootstrap confidence interval. Runs once in NVFP4 (the quant family has
operands only there) and once in BF16.

A second phase times the Monitor's own code directly on the all-families copy: forward hooks
bracketed by timing hooks, ``after_backward()``, ``step()``, and each new family's collector
methods (:data:`FAMILY_METHODS`), plus the writer thread's CPU time, so each family's cost is
known without A/B noise.

Every step and every family method is timed twice: by the wall clock and by the training thread's
own CPU time (``time.thread_time_ns()``). On a shared machine the wall clock also counts the time the
thread waits for a core that other tenants hold (at load 11-15 on 2 cores a step's wall time
varied by +-20 %); the thread's CPU time counts only its own work, so the CPU-time shares are the
load-independent figures. ``torch.set_num_threads(1)`` keeps the compute (forward, backward,
optimizer, the Monitor's device ops) in the calling thread, so its CPU time is the whole step's. A third phase counts host reads (``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``float()``, ``bool()``, ``int()`` on tensors) made from the Monitor's code on
non-flush steps.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    NA,
    Budget,
    Job,
    Section,
    Table,
    bootstrap_ci,
    child_main,
    emit_progress,
    fmt_time,
    median,
    percentile,
    thread_cpu_seconds,
    verdict,
)

#: Medium reference trainer (12 blocks + the shared MTP block, hidden 256): ≥ 50 ms/step on 2 cores.
MODEL = {
    "vocab_size": 2048,
    "d_model": 256,
    "pattern": "M E * E M E M E * E M E",
    "n_heads": 8,
    "n_kv_heads": 4,
    "headdim": 32,
    "chunk_size": 32,
    "num_experts": 16,
    "top_k": 4,
    "moe_latent_dim": 128,
    "moe_ffn": 256,
    "shared_expert_ffn": 512,
    "mlp_ffn": 512,
    # No NVFP4 fake quantisation: a faster step makes the overhead ratio larger (conservative).
    "precision": "bf16",
}
BATCH, SEQ = 4, 128
BUDGET_PCT = 1.0
#: Gradient clipping of the reference trainer (``healthwatch.demo.trainer.TrainConfig.grad_clip``).
CLIP = 1.0


class SyncCounter:
    """Counts host reads of tensors made (directly or indirectly) from code under ``roots``.

    Only calls on the thread that entered the counter count (the writer thread decodes on the
    host by design, after the flush's one copy).
    """

    NAMES = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__", "__index__")

    def __init__(self, roots: list[str]) -> None:
        self.roots = tuple(roots)
        self.calls: list[str] = []
        self._orig: dict[str, Any] = {}
        self._tid = 0

    def _from_roots(self) -> bool:
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename.startswith(self.roots):
                return True
            f = f.f_back
        return False

    def __enter__(self) -> SyncCounter:
        import torch

        self._tid = threading.get_ident()
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name, None)
            if orig is None:
                continue
            self._orig[name] = orig

            def wrapper(t: Any, *a: Any, __n: str = name, __o: Any = orig, **k: Any) -> Any:
                if threading.get_ident() == self._tid and self._from_roots():
                    self.calls.append(__n)
                return __o(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)


def _writer_thread(run: str) -> threading.Thread | None:
    for t in threading.enumerate():
        if t.name == f"healthwatch-writer-{run}":
            return t
    return None


#: Monitor variants timed side by side: name -> signal families (None: no Monitor at all;
#: "default": ``MonitorConfig()`` as shipped, the families sampled every ``signals_every`` steps).
CONFIGS: dict[str, Any] = {
    "none": None,
    "five": (),
    "+quant": ("quant",),
    "+router": ("router",),
    "+mamba": ("mamba",),
    "+update": ("update",),
    "all": ("quant", "router", "mamba", "update"),
    "default": "default",
}
#: Collector methods that do each new family's work (timed directly in the attribution phase).
FAMILY_METHODS = {
    "quant": ("quant_stats", "_quant_flush"),
    "router": ("_router_health", "_router_flush"),
    "mamba": ("_dt_stats", "_dt_flush"),
    "update": ("after_optimizer_step",),
    "param-side (decay, expert bias)": ("_param_stats",),
}
#: Collector methods of FAMILY_METHODS that run outside the bracketed forward hooks and outside
#: ``step()`` (quantisation observers inside module forwards, Mamba dt hooks on ``in_proj``, the
#: optimizer post-step hook): with those two, the Monitor's whole time on the training thread.
OUTSIDE_METHODS = ("quant_stats", "_dt_stats", "after_optimizer_step")
#: The hook-overhead budget of issue 17: the benchmark's figure with every signal on at every step
#: stays within this many percentage points of the figure when the issue was filed (the five
#: signals of commit f8549be, :data:`BASELINE`).
FAMILY_BUDGET_PP = 0.5
#: "Today's figure" when issue 17 was filed: the five signals' attributed CPU time at f8549be (the
#: commit before the first new signal), measured by ``benchmarks/overhead_attribution.py`` on a
#: checkout of it, alternating with this tree (BENCHMARKS.md section 1 says how).
BASELINE = Path(__file__).parent / "results" / "overhead-baseline-f8549be.json"


def run_overhead(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: interleaved step times of every Monitor variant, attributed time, host syncs."""
    import torch

    import healthwatch as hw
    import healthwatch.hooks as hw_hooks
    from healthwatch.demo.data import SyntheticTokens
    from healthwatch.demo.model import HybridConfig, HybridLM

    rounds = int(params.get("pairs", 40))
    warmup = int(params.get("warmup", 3))
    attrib_steps = int(params.get("attrib_steps", 20))
    sync_steps = int(params.get("sync_steps", 10))
    root = Path(params["workdir"]) / f"overhead-store-{params.get('precision', 'bf16')}"
    model_kw = dict(MODEL, **params.get("model", {}))
    if params.get("precision"):
        model_kw["precision"] = params["precision"]
    batch, seq = int(params.get("batch", BATCH)), int(params.get("seq", SEQ))
    names = [n for n in params.get("configs", list(CONFIGS)) if n in CONFIGS]

    # One intra-op thread: on a shared 2-core machine two OpenMP threads spin-wait against the other
    # tenants' processes (a step of this model measured 20 s with 2 threads, 2.6 s with 1, load ~11).
    torch.set_num_threads(int(params.get("threads", 1)))
    torch.manual_seed(0)
    cfg = HybridConfig(**model_kw)
    base = HybridLM(cfg)
    data = SyntheticTokens(cfg.vocab_size, seq, batch, seed=0)
    tokens_per_step = batch * seq
    n_params = sum(p.numel() for p in base.parameters())

    variants: dict[str, dict[str, Any]] = {}
    for name in names:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fams = CONFIGS[name]
        mon = None
        if fams is not None:
            mcfg = hw.MonitorConfig() if fams == "default" else hw.MonitorConfig(signals=fams, signals_every=1)
            mon = hw.Monitor(store=root, run=f"overhead-{name.strip('+')}", precision=cfg.precision, log_every=1,
                             expert_load_every=1, config={"benchmark": "overhead", "variant": name},
                             monitor_config=mcfg)
            mon.watch(model)
        variants[name] = {"model": model, "opt": opt, "mon": mon, "step": 0, "times": [], "cpu": [], "clip_cpu": []}

    def train(v: dict[str, Any], i: int) -> float:
        """One training step of variant ``v``; its wall time (returned) and training-thread CPU time (kept)."""
        model, opt, mon = v["model"], v["opt"], v["mon"]
        ids = data.batch_at(i)
        c0 = time.thread_time_ns()
        t0 = time.perf_counter()
        out = model(ids)
        out.total_loss.backward()
        # Gradients clipped as the reference trainer (healthwatch.demo.trainer) clips them: by torch
        # without a Monitor, by the Monitor's clip_grad_norm_ (wgrad norms and clipping in one read
        # of the gradients) with one. The clip's own CPU time is kept for the attribution phase.
        c_clip = time.thread_time_ns()
        if mon is not None:
            mon.clip_grad_norm_(model.parameters(), CLIP)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        v["clip_cpu"].append((time.thread_time_ns() - c_clip) / 1e9)
        opt.step()  # the update family (when on) runs in the optimizer's post-step hook
        opt.zero_grad(set_to_none=True)
        if mon is not None:
            mon.step(v["step"], tokens=(v["step"] + 1) * tokens_per_step, loss=out.loss,
                     mtp_losses=out.mtp_losses, lr=1e-3)
        dt = time.perf_counter() - t0
        v["cpu"].append((time.thread_time_ns() - c0) / 1e9)
        v["step"] += 1
        return dt

    total_units = len(names) * (warmup + rounds) + attrib_steps + sync_steps
    done = 0
    for i in range(warmup):
        for name in names:
            train(variants[name], i)
            done += 1
        emit_progress(done, total_units, "warm-up")
    for v in variants.values():
        v["cpu"].clear()  # only the interleaved rounds' CPU times are compared
        v["clip_cpu"].clear()

    # -- phase 1: every variant once per round, in a rotated order ----------------------------
    # Round k starts at variant k mod n (a Latin square over rounds): each variant runs in every
    # position equally often, so drift and "who ran just before me" effects cancel.
    phase_t0 = time.perf_counter()
    writers = {n: _writer_thread(v["mon"].run) for n, v in variants.items() if v["mon"] is not None}
    w0 = {n: thread_cpu_seconds(t) if t else None for n, t in writers.items()}
    for k in range(rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            variants[name]["times"].append(train(variants[name], warmup + k))
            done += 1
        emit_progress(done, total_units, "interleaved steps")
    phase_wall = time.perf_counter() - phase_t0
    writer_cpu: dict[str, float | None] = {}
    for n, v in variants.items():
        if v["mon"] is None:
            continue
        v["mon"].flush(wait=True)
        w1 = thread_cpu_seconds(writers[n]) if writers[n] else None
        writer_cpu[n] = (w1 - w0[n]) / rounds if (w1 is not None and w0[n] is not None) else None

    # -- phase 2: time the Monitor's own code on the "all" variant ----------------------------
    target = "all" if "all" in variants else next(n for n in names if variants[n]["mon"] is not None)
    tv = variants[target]
    mon = tv["mon"]
    spec = mon.spec
    collector = mon._collector
    outside_cpu = [0]
    fam_time: dict[str, float] = {f: 0.0 for f in FAMILY_METHODS}
    fam_cpu: dict[str, int] = {f: 0 for f in FAMILY_METHODS}
    for fam, methods in FAMILY_METHODS.items():
        for meth in methods:
            orig = getattr(collector, meth)

            def timed(*a: Any, __o: Any = orig, __f: str = fam, __m: str = meth, **k: Any) -> Any:
                c0 = time.thread_time_ns()
                t0 = time.perf_counter()
                try:
                    return __o(*a, **k)
                finally:
                    fam_time[__f] += time.perf_counter() - t0
                    fam_cpu[__f] += time.thread_time_ns() - c0
                    if __m in OUTSIDE_METHODS:
                        outside_cpu[0] += time.thread_time_ns() - c0

            setattr(collector, meth, timed)  # an instance attribute shadows the method

    hook_time = [0.0]
    hook_cpu = [0]
    starts: dict[int, float] = {}
    cpu_starts: dict[int, int] = {}
    handles = []
    hooked = {id(b.module): b.module for b in spec.blocks if b.residual}
    hooked.update({id(r.module): r.module for r in spec.routers})

    def pre(mod: Any, _i: Any, _o: Any) -> None:
        starts[id(mod)] = time.perf_counter()
        cpu_starts[id(mod)] = time.thread_time_ns()

    def post(mod: Any, _i: Any, _o: Any) -> None:
        c0 = cpu_starts.pop(id(mod), None)
        if c0 is not None:
            hook_cpu[0] += time.thread_time_ns() - c0
        t0 = starts.pop(id(mod), None)
        if t0 is not None:
            hook_time[0] += time.perf_counter() - t0

    for m in hooked.values():
        handles.append(m.register_forward_hook(pre, prepend=True))
        handles.append(m.register_forward_hook(post))
    # Cost of the timing hooks themselves, measured on a module without the Monitor's hook.
    probe = torch.nn.Identity()
    probe.register_forward_hook(pre, prepend=True)
    probe.register_forward_hook(post)
    x = torch.zeros(1)
    hook_time[0] = 0.0
    hook_cpu[0] = 0
    for _ in range(2000):
        probe(x)
    bracket_cost = hook_time[0] / 2000
    bracket_cpu = hook_cpu[0] / 1e9 / 2000

    hooks_s: list[float] = []
    ab_s: list[float] = []
    step_s: list[float] = []
    hooks_cpu: list[float] = []
    outside_s: list[float] = []
    ab_cpu: list[float] = []
    step_cpu: list[float] = []
    families_s: dict[str, list[float]] = {f: [] for f in FAMILY_METHODS}
    families_cpu_s: dict[str, list[float]] = {f: [] for f in FAMILY_METHODS}
    attrib_step_cpu: list[float] = []
    attrib_step_wall: list[float] = []
    model_b, opt_b = tv["model"], tv["opt"]
    for k in range(attrib_steps):
        ids = data.batch_at(warmup + rounds + k)
        hook_time[0] = 0.0
        for f in fam_time:
            fam_time[f] = 0.0
            fam_cpu[f] = 0
        hook_cpu[0] = 0
        outside_cpu[0] = 0
        c_step, t_step = time.thread_time_ns(), time.perf_counter()
        out = model_b(ids)
        hooks_s.append(max(0.0, hook_time[0] - bracket_cost * len(hooked)))
        hooks_cpu.append(max(0.0, hook_cpu[0] / 1e9 - bracket_cpu * len(hooked)))
        out.total_loss.backward()
        t0, c0 = time.perf_counter(), time.thread_time_ns()
        mon.clip_grad_norm_(model_b.parameters(), CLIP)
        ab_s.append(time.perf_counter() - t0)
        ab_cpu.append((time.thread_time_ns() - c0) / 1e9)
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.thread_time_ns()
        mon.step(tv["step"], tokens=(tv["step"] + 1) * tokens_per_step, loss=out.loss, mtp_losses=out.mtp_losses,
                 lr=1e-3)
        step_s.append(time.perf_counter() - t0)
        step_cpu.append((time.thread_time_ns() - c0) / 1e9)
        outside_s.append(outside_cpu[0] / 1e9)
        attrib_step_wall.append(time.perf_counter() - t_step)
        attrib_step_cpu.append((time.thread_time_ns() - c_step) / 1e9)
        for f, v in fam_time.items():
            families_s[f].append(v)
            families_cpu_s[f].append(fam_cpu[f] / 1e9)
        tv["step"] += 1
        done += 1
        emit_progress(done, total_units, "attributing Monitor time")
    for h in handles:
        h.remove()

    # -- phase 3: host reads from the Monitor's code on non-flush steps -----------------------
    mon.flush(wait=True)
    mon.flush_every_steps, mon.flush_every_s = 10**9, 1e12
    hooks_root = [str(Path(hw_hooks.__file__).resolve().parent)]
    counter = SyncCounter(hooks_root)
    with counter:
        for k in range(sync_steps):
            ids = data.batch_at(warmup + rounds + attrib_steps + k)
            out = model_b(ids)
            out.total_loss.backward()
            mon.clip_grad_norm_(model_b.parameters(), CLIP)
            opt_b.step()
            opt_b.zero_grad(set_to_none=True)
            mon.step(tv["step"], tokens=(tv["step"] + 1) * tokens_per_step, loss=out.loss,
                     mtp_losses=out.mtp_losses, lr=1e-3)
            mon.log({"opt/lr_scale": out.loss.detach() * 0.0 + 1.0}, step=tv["step"])
            tv["step"] += 1
            done += 1
            emit_progress(done, total_units, "counting host syncs")
    non_flush_syncs = list(counter.calls)
    counter = SyncCounter(hooks_root)
    with counter:
        mon.flush()
    flush_syncs = list(counter.calls)
    dropped = {}
    for n, v in variants.items():
        if v["mon"] is not None:
            v["mon"].close()
            dropped[n] = v["mon"].dropped_rows

    st = hw.open_store(root)
    try:
        run = f"overhead-{target.strip('+')}"
        steps_logged = st.sql("SELECT count(DISTINCT step) FROM scalars WHERE run = ? AND name = 'loss/train'",
                              [run]).fetchone()[0]
        scalar_rows = st.sql("SELECT count(*) FROM scalars WHERE run = ?", [run]).fetchone()[0]
        layer_rows = st.sql("SELECT count(*) FROM layer_stats WHERE run = ?", [run]).fetchone()[0]
        load_rows = st.sql("SELECT count(*) FROM expert_load WHERE run = ?", [run]).fetchone()[0]
        metrics = [r[0] for r in st.sql("SELECT DISTINCT metric FROM layer_stats WHERE run = ? ORDER BY 1",
                                        [run]).fetchall()]
    finally:
        st.close()

    return {
        "model": model_kw, "batch": batch, "seq": seq, "params": n_params,
        "blocks": len(spec.blocks), "routers": len(spec.routers), "threads": torch.get_num_threads(),
        "pairs": rounds, "configs": names, "times": {n: variants[n]["times"] for n in names},
        "cpu_times": {n: variants[n]["cpu"] for n in names},
        "families_cpu_s": families_cpu_s, "attrib_step_cpu_s": attrib_step_cpu, "attrib_step_wall_s": attrib_step_wall,
        "a_times": variants["none"]["times"] if "none" in variants else [],
        "b_times": tv["times"], "target": target, "phase_wall_s": phase_wall,
        "writer_cpu_per_step_s": writer_cpu.get(target), "writer_cpu": writer_cpu,
        "hooks_s": hooks_s, "after_backward_s": ab_s, "hooks_cpu_s": hooks_cpu, "clip_cpu_s": ab_cpu,
        "step_cpu_s": step_cpu, "outside_cpu_s": outside_s, "clip": CLIP,
        "torch_clip_cpu_s": variants["none"]["clip_cpu"] if "none" in variants else [],
        "step_s": step_s, "families_s": families_s, "bracket_cost_s": bracket_cost, "hooked_modules": len(hooked),
        "sync_steps": sync_steps, "non_flush_syncs": non_flush_syncs, "flush_syncs": flush_syncs,
        "steps_logged": steps_logged, "scalar_rows": scalar_rows, "layer_rows": layer_rows,
        "load_rows": load_rows, "metrics": metrics, "dropped_rows": sum(dropped.values()),
        "load_average": list(os.getloadavg()),
    }


TASKS = {"overhead": run_overhead}


def jobs(quick: bool, workdir: Path, pairs: int | None = None, batch: int | None = None) -> list[Job]:
    """The child tasks of this benchmark: the NVFP4 reference trainer (every variant, the quant family
    included) and the BF16 one (the five signals' historical figure; no quantised layers)."""
    n = pairs if pairs is not None else (2 if quick else 40)
    common = {"pairs": n, "warmup": 1 if quick else 3, "attrib_steps": 2 if quick else 20,
              "sync_steps": 2 if quick else 8, "workdir": str(workdir), "batch": batch or (2 if quick else BATCH)}
    bf16 = [c for c in CONFIGS if c != "+quant"]
    out = [Job("overhead", "benchmarks.bench_overhead", "overhead", {**common, "precision": "nvfp4"},
               f"hook overhead, NVFP4 ({n} rounds x {len(CONFIGS)} variants)", timeout_s=900 if quick else 3600)]
    if not quick:  # --quick checks that the benchmark runs; one precision is enough for that
        out.append(Job("overhead:bf16", "benchmarks.bench_overhead", "overhead",
                       {**common, "precision": "bf16", "configs": bf16},
                       f"hook overhead, BF16 ({n} rounds x {len(bf16)} variants)", timeout_s=3600))
    return out


def _pp(diffs: list[float], base: float) -> tuple[float, float, float]:
    """Median of paired differences and its bootstrap 95 % CI, in percent of ``base``."""
    lo, hi = bootstrap_ci(diffs)
    return 100 * median(diffs) / base, 100 * lo / base, 100 * hi / base


def _vs_five_cpu(r: dict[str, Any], name: str) -> str:
    """Paired median of ``name``'s training-thread CPU time over ``five``'s, in pp of the no-Monitor CPU step."""
    cpu = r.get("cpu_times") or {}
    if name in ("none", "five") or not cpu.get(name) or not cpu.get("five") or not cpu.get("none"):
        return "—"
    pp, lo, hi = _pp([b - a for a, b in zip(cpu["five"], cpu[name])], median(cpu["none"]))
    return f"{pp:+.2f} pp ({lo:+.2f} … {hi:+.2f})"


def _variant_table(r: dict[str, Any], label: str) -> Table:
    times = r["times"]
    none = times["none"]
    base = median(none)
    cpu = r.get("cpu_times") or {}
    rows = []
    for name in r["configs"]:
        t = times[name]
        row = [f"`{name}`", fmt_time(median(t)), fmt_time(percentile(t, 10)), fmt_time(percentile(t, 90))]
        if name == "none":
            row += ["—", "—"]
        else:
            pct, lo, hi = _pp([b - a for a, b in zip(none, t)], base)
            row.append(f"{pct:+.2f} % ({lo:+.2f} … {hi:+.2f})")
            if name == "five" or "five" not in times:
                row.append("—")
            else:
                pp, lo, hi = _pp([b - a for a, b in zip(times["five"], t)], base)
                row.append(f"{pp:+.2f} pp ({lo:+.2f} … {hi:+.2f})")
        row.append(fmt_time(median(cpu[name])) if cpu.get(name) else "—")
        row.append(_vs_five_cpu(r, name))
        w = r.get("writer_cpu", {}).get(name)
        row.append("—" if w is None else f"{fmt_time(w)} ({100 * w / base:.2f} %)")
        rows.append(row)
    spread = percentile(none, 90) / percentile(none, 10) if none else math.nan
    return Table(
        f"{label}: step time of each variant ({r['pairs']} rounds, rotated order)",
        ["variant", "median step", "p10", "p90", "vs no Monitor (paired, 95 % CI)", "vs five signals (paired, 95 % CI)",
         "median step, thread CPU", "vs five signals, thread CPU (paired, 95 % CI)", "writer CPU / step"],
        rows,
        "`five` = the report's five signals only (`signals=()`); `+family` = five + that family, every step "
        "(`signals_every=1`); `all` = every family every step; `default` = `MonitorConfig()` as shipped. "
        "Thread CPU = the training thread's own CPU time (`time.thread_time_ns()`), which other tenants' load does "
        "not inflate as it does the wall clock; its pp are of the no-Monitor step's CPU time. "
        f"p90/p10 spread of the no-Monitor step times {spread:.2f} (1.0 = a quiet machine); load average at the "
        f"end of the task {' / '.join(f'{x:.2f}' for x in r.get('load_average', []))}.",
    )


def _cpu_base(r: dict[str, Any]) -> float | None:
    """Median training-thread CPU time of a no-Monitor step, or None (an older result)."""
    none = (r.get("cpu_times") or {}).get("none")
    return median(none) if none else None


def _family_table(r: dict[str, Any], label: str) -> Table:
    base = median(r["times"]["none"])
    cpu_base = _cpu_base(r)
    fam_cpu = r.get("families_cpu_s") or {}
    rows = []
    total = total_cpu = 0.0
    for fam, vals in r["families_s"].items():
        m = median(vals)
        total += m
        row = [fam, fmt_time(m), fmt_time(percentile(vals, 95)), f"{100 * m / base:.3f} pp"]
        c = fam_cpu.get(fam)
        if c and cpu_base:
            total_cpu += median(c)
            row += [fmt_time(median(c)), f"{100 * median(c) / cpu_base:.3f} pp"]
        else:
            row += ["—", "—"]
        rows.append(row)
    rows.append(["sum of the new families", fmt_time(total), "—", f"{100 * total / base:.3f} pp",
                 fmt_time(total_cpu) if cpu_base else "—", f"{100 * total_cpu / cpu_base:.3f} pp" if cpu_base else "—"])
    steps = r.get("attrib_step_cpu_s")
    note = ""
    if steps and cpu_base:
        note = (f" The `{r['target']}` steps of this phase took {fmt_time(median(steps))} of thread CPU (median; "
                f"wall {fmt_time(median(r['attrib_step_wall_s']))}) against {fmt_time(cpu_base)} for a no-Monitor step.")
    return Table(
        f"{label}: each new family's own cost (time inside its code, `all` variant, per step)",
        ["family", "median (wall)", "p95 (wall)", "share of a no-Monitor step (wall)", "median (thread CPU)",
         "share of a no-Monitor step (thread CPU)"],
        rows,
        "Measured by timing the collector methods that do each family's work (listed in "
        "`benchmarks/bench_overhead.py: FAMILY_METHODS`) by the wall clock and by the training thread's CPU "
        "time; no A/B noise, but the extra rows' writer-thread work is not in it (see the writer column above)."
        + note,
    )


def _monitor_cpu(r: dict[str, Any]) -> list[float] | None:
    """The Monitor's training-thread CPU time per attribution step: its forward hooks, its share of
    the gradient pass (``clip_grad_norm_`` minus torch's clip of the no-Monitor copy, median), ``step()``
    and the collector methods that run elsewhere (:data:`OUTSIDE_METHODS`); None for older results."""
    need = ("hooks_cpu_s", "clip_cpu_s", "step_cpu_s", "outside_cpu_s", "torch_clip_cpu_s")
    if any(not r.get(k) for k in need):
        return None
    torch_clip = median(r["torch_clip_cpu_s"])
    return [h + (c - torch_clip) + s + o for h, c, s, o in
            zip(r["hooks_cpu_s"], r["clip_cpu_s"], r["step_cpu_s"], r["outside_cpu_s"])]


def _cpu_rows(r: dict[str, Any]) -> list[list[str]]:
    """Rows of the training-thread CPU attribution (newer results only): the trainer's own clip,
    subtracted, and the Monitor's total."""
    monitor, cpu_base = _monitor_cpu(r), _cpu_base(r)
    if not monitor or not cpu_base:
        return []
    tc = r["torch_clip_cpu_s"]
    return [
        ["thread CPU: torch's `clip_grad_norm_` on the no-Monitor copy (the trainer's own, subtracted)",
         fmt_time(median(tc)), fmt_time(percentile(tc, 95)), f"{100 * median(tc) / cpu_base:.3f} % (CPU)"],
        ["thread CPU: the Monitor in all (hooks + its share of the clip + `step()` + observers, dt, update)",
         fmt_time(median(monitor)), fmt_time(percentile(monitor, 95)), f"{100 * median(monitor) / cpu_base:.3f} % (CPU)"],
    ]


def _baseline_pct(precision: str) -> float | None:
    """Today's figure (issue 17) for ``precision`` ("NVFP4"/"BF16"), from :data:`BASELINE`, or None."""
    try:
        data = json.loads(BASELINE.read_text())
    except (OSError, ValueError):
        return None
    found = data.get(precision.lower(), {})
    return float(found["monitor_pct"]) if "monitor_pct" in found else None


def section(results: dict[str, dict[str, Any]]) -> Section:
    """Turn the children's raw measurements into budget rows and tables."""
    sec = Section("overhead", "1. Hook overhead on the reference trainer")
    runs = [(key, label) for key, label in (("overhead:bf16", "BF16"), ("overhead", "NVFP4")) if key in results]
    ok = [(key, label) for key, label in runs if "error" not in results[key] and "times" in results[key]]
    for key, _label in runs:
        if (key, _label) not in ok:
            sec.errors.append(f"{key}: {results[key].get('error', 'old result format')}")
    if not ok:
        if not runs:
            sec.errors.append("did not run")
        sec.budgets.append(Budget("Monitor overhead, all signals, log every step", "≤ 1 %", "error", NA))
        return sec
    r0 = results[ok[0][0]]
    m = r0["model"]
    sec.intro = (
        f"Reference trainer `HybridLM` ({len(m['pattern'].split())} blocks `{m['pattern']}` + shared MTP block, "
        f"hidden {m['d_model']}, {m['num_experts']} experts top-{m['top_k']}, vocab {m['vocab_size']}, "
        f"{r0['params'] / 1e6:.1f}M parameters), batch {r0['batch']}×{r0['seq']} tokens, AdamW, torch threads "
        f"{r0['threads']}; once in BF16 (the five signals' historical figure) and once in NVFP4 (fake-quantised "
        f"GEMMs: the only variant where the quant family has operands to read). Monitor: {r0['blocks']} blocks and "
        f"{r0['routers']} routers hooked, `log_every=1`, expert load every step, default flush cadence. Every "
        "variant is its own model copy (same initial weights, same batches) and they run in one process, "
        "one step each per round in a rotated order, so that the differences are measured on the same machine state."
    )
    for key, label in ok:
        r = results[key]
        times = r["times"]
        base = median(times["none"])
        if "five" in times:
            pct, lo, hi = _pp([b - a for a, b in zip(times["none"], times["five"])], base)
            sec.budgets.append(Budget(f"{label}: Monitor overhead, the five signals (A/B, paired median)", "≤ 1 %",
                                      f"{pct:+.2f} % (95 % CI {lo:+.2f} … {hi:+.2f} %)", verdict(pct <= 1.0)))
        cpu_base = _cpu_base(r)
        monitor = _monitor_cpu(r)
        if cpu_base and monitor:
            pct = 100 * median(monitor) / cpu_base
            then = _baseline_pct(label)
            measured = f"{pct:.2f} % ({fmt_time(median(monitor))} of {fmt_time(cpu_base)} CPU/step)"
            if then is None:
                sec.budgets.append(Budget(
                    f"{label}: the Monitor, every signal at every step (attributed, training-thread CPU)",
                    f"≤ today's figure +{FAMILY_BUDGET_PP} pp", measured, NA, f"no baseline in {BASELINE.name}"))
            else:
                sec.budgets.append(Budget(
                    f"{label}: the Monitor, every signal at every step (attributed, training-thread CPU), "
                    f"against today's figure (the five signals at f8549be: {then:.2f} %)",
                    f"≤ +{FAMILY_BUDGET_PP} pp", f"{measured}: {pct - then:+.2f} pp",
                    verdict(pct - then <= FAMILY_BUDGET_PP),
                    "issue 17's budget; the baseline is measured in its own processes (BENCHMARKS.md section 1)",
                ))
        # Each new family's own cost, as the issue asks it reported (informative: the budget is on the
        # whole figure, above; the five signals' own path got cheaper meanwhile).
        fam_cpu = r.get("families_cpu_s") or {}
        if cpu_base and fam_cpu:
            cpu_total = sum(median(v) for v in fam_cpu.values())
            sec.budgets.append(Budget(
                f"{label}: the new families alone, every step (training-thread CPU time in their code)",
                "reported", f"{100 * cpu_total / cpu_base:.2f} pp ({fmt_time(cpu_total)} of "
                f"{fmt_time(cpu_base)} CPU/step)", NA, "each family's own row: the family table",
            ))
        cpu = r.get("cpu_times") or {}
        if cpu_base and cpu.get("all") and cpu.get("five"):
            pp, lo, hi = _pp([b - a for a, b in zip(cpu["five"], cpu["all"])], cpu_base)
            sec.budgets.append(Budget(
                f"{label}: all new families every step, over the five signals (A/B on thread CPU, paired median)",
                "reported", f"{pp:+.2f} pp (95 % CI {lo:+.2f} … {hi:+.2f})", NA,
                "the whole step's CPU time; the CI says how far an A/B can resolve on this machine",
            ))
        syncs = r["non_flush_syncs"]
        sec.budgets.append(Budget(
            f"{label}: host syncs on non-flush steps (all families on)", "0", f"{len(syncs)} in {r['sync_steps']} steps",
            verdict(len(syncs) == 0), "" if not syncs else ", ".join(sorted(set(syncs))),
        ))
        sec.tables.append(_variant_table(r, label))
        sec.tables.append(_family_table(r, label))
        hooks, ab, st = r["hooks_s"], r["after_backward_s"], r["step_s"]
        writer = r.get("writer_cpu_per_step_s")
        sec.tables.append(Table(
            f"{label}: where the Monitor's time goes (`{r['target']}` variant, per step, measured inside its code)",
            ["part", "median", "p95", "share of a no-Monitor step"],
            [
                ["forward hooks on blocks and routers (residual RMS, expert counts, router health)",
                 fmt_time(median(hooks)), fmt_time(percentile(hooks, 95)), f"{100 * median(hooks) / base:.3f} %"],
                ["`clip_grad_norm_()` (grad norms and the trainer's clipping: one `_foreach_norm`, one scaling)",
                 fmt_time(median(ab)), fmt_time(percentile(ab, 95)), f"{100 * median(ab) / base:.3f} %"],
                ["`step()` (incl. staged quant statistics and the flushes that fell in)", fmt_time(median(st)),
                 fmt_time(percentile(st, 95)), f"{100 * median(st) / base:.3f} %"],
                ["writer thread CPU (decode + Parquet + self-merge)", fmt_time(writer), "—",
                 "—" if writer is None else f"{100 * writer / base:.3f} %"],
                *_cpu_rows(r),
            ],
            f"Timing hooks cost {fmt_time(r['bracket_cost_s'])} per module and were subtracted. "
            f"Rows written by `{r['target']}`: {r['steps_logged']} steps, {r['scalar_rows']} scalar rows, "
            f"{r['layer_rows']} layer rows ({len(r['metrics'])} metrics), {r['load_rows']} expert-load rows; "
            f"{r['dropped_rows']} dropped over all variants. Host reads in one flush on the training thread: "
            f"{len(r['flush_syncs'])}.",
        ))
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
