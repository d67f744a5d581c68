"""Benchmark 1: hook overhead of the Monitor on the reference trainer, and host syncs.

Two identical copies of the reference model (:class:`healthwatch.demo.model.HybridLM`, same
initial weights, same batches) train side by side in one process: copy A without a Monitor,
copy B watched by a Monitor with every signal on (``log_every=1``, expert load every step,
default flush cadence). Steps alternate A B B A A B … so that drift (thermal, other tenants)
cancels; the overhead is the median of the paired differences B - A, with a bootstrap
confidence interval, next to the ratio of trimmed means.

A second phase times the Monitor's own code directly on copy B (forward hooks bracketed by
timing hooks registered before and after them, ``after_backward()``, ``step()``), and reads the
CPU time of the Monitor's writer thread, so the overhead is also known without A/B noise. A third
phase counts host reads (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float()``,
``bool()``, ``int()`` on tensors) made from the Monitor's code on non-flush steps.
"""

from __future__ import annotations

import copy
import math
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
    trimmed_mean,
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


def run_overhead(params: dict[str, Any]) -> dict[str, Any]:
    """Child task: A/B step times, attributed Monitor time, writer CPU, host syncs."""
    import torch

    import healthwatch as hw
    import healthwatch.hooks as hw_hooks
    from healthwatch.demo.data import SyntheticTokens
    from healthwatch.demo.model import HybridConfig, HybridLM

    pairs = int(params.get("pairs", 60))
    warmup = int(params.get("warmup", 3))
    attrib_steps = int(params.get("attrib_steps", 20))
    sync_steps = int(params.get("sync_steps", 10))
    store = Path(params["workdir"]) / "overhead-store"
    model_kw = dict(MODEL, **params.get("model", {}))
    batch, seq = int(params.get("batch", BATCH)), int(params.get("seq", SEQ))

    torch.manual_seed(0)
    cfg = HybridConfig(**model_kw)
    model_a = HybridLM(cfg)
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-3)
    data = SyntheticTokens(cfg.vocab_size, seq, batch, seed=0)
    tokens_per_step = batch * seq
    n_params = sum(p.numel() for p in model_a.parameters())

    run = "overhead"
    mon = hw.Monitor(store=store, run=run, precision=cfg.precision, log_every=1, expert_load_every=1,
                     config={"benchmark": "overhead"})
    spec = mon.watch(model_b)
    writer = _writer_thread(run)

    step_b = 0

    def train(which: str, i: int) -> float:
        nonlocal step_b
        ids = data.batch_at(i)
        if which == "A":
            t0 = time.perf_counter()
            out = model_a(ids)
            out.total_loss.backward()
            opt_a.step()
            opt_a.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model_b(ids)
        out.total_loss.backward()
        mon.after_backward()
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        mon.step(step_b, tokens=(step_b + 1) * tokens_per_step, loss=out.loss, mtp_losses=out.mtp_losses, lr=1e-3)
        dt = time.perf_counter() - t0
        step_b += 1
        return dt

    total_units = 2 * warmup + 2 * pairs + attrib_steps + sync_steps
    done = 0
    for i in range(warmup):
        train("A", i)
        train("B", i)
        done += 2
        emit_progress(done, total_units, "warm-up")

    # -- phase 1: interleaved A/B ------------------------------------------------------------
    a_times: list[float] = []
    b_times: list[float] = []
    w0 = thread_cpu_seconds(writer) if writer else None
    b0 = step_b
    phase_t0 = time.perf_counter()
    for k in range(pairs):
        i = warmup + k
        order = ("A", "B") if k % 2 == 0 else ("B", "A")  # A B B A A B ...
        for which in order:
            (a_times if which == "A" else b_times).append(train(which, i))
        done += 2
        emit_progress(done, total_units, "A/B steps")
    phase_wall = time.perf_counter() - phase_t0
    mon.flush(wait=True)  # the writer's work for phase 1 is counted to phase 1
    w1 = thread_cpu_seconds(writer) if writer else None
    b_steps = step_b - b0
    writer_cpu_per_step = (w1 - w0) / b_steps if (w0 is not None and w1 is not None and b_steps) else None

    # -- phase 2: time the Monitor's own code on copy B ---------------------------------------
    hook_time = [0.0]
    starts: dict[int, float] = {}
    handles = []
    hooked = {id(b.module): b.module for b in spec.blocks if b.residual}
    hooked.update({id(r.module): r.module for r in spec.routers})

    def pre(mod: Any, _i: Any, _o: Any) -> None:
        starts[id(mod)] = time.perf_counter()

    def post(mod: Any, _i: Any, _o: Any) -> None:
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
    for _ in range(2000):
        probe(x)
    bracket_cost = hook_time[0] / 2000

    hooks_s: list[float] = []
    ab_s: list[float] = []
    step_s: list[float] = []
    for k in range(attrib_steps):
        ids = data.batch_at(warmup + pairs + k)
        hook_time[0] = 0.0
        out = model_b(ids)
        hooks_s.append(max(0.0, hook_time[0] - bracket_cost * len(hooked)))
        out.total_loss.backward()
        t0 = time.perf_counter()
        mon.after_backward()
        ab_s.append(time.perf_counter() - t0)
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        mon.step(step_b, tokens=(step_b + 1) * tokens_per_step, loss=out.loss, mtp_losses=out.mtp_losses, lr=1e-3)
        step_s.append(time.perf_counter() - t0)
        step_b += 1
        done += 1
        emit_progress(done, total_units, "attributing Monitor time")
    for h in handles:
        h.remove()

    # -- phase 3: host reads from the Monitor's code on non-flush steps -----------------------
    mon.flush(wait=True)
    mon.flush_every_steps, mon.flush_every_s = 10**9, 1e12
    roots = [str(Path(hw_hooks.__file__).resolve().parent)]
    counter = SyncCounter(roots)
    with counter:
        for k in range(sync_steps):
            ids = data.batch_at(warmup + pairs + attrib_steps + k)
            out = model_b(ids)
            out.total_loss.backward()
            mon.after_backward()
            opt_b.step()
            opt_b.zero_grad(set_to_none=True)
            mon.step(step_b, tokens=(step_b + 1) * tokens_per_step, loss=out.loss,
                     mtp_losses=out.mtp_losses, lr=1e-3)
            mon.log({"opt/lr_scale": out.loss.detach() * 0.0 + 1.0}, step=step_b)
            step_b += 1
            done += 1
            emit_progress(done, total_units, "counting host syncs")
    non_flush_syncs = list(counter.calls)
    counter = SyncCounter(roots)
    with counter:
        mon.flush()
    flush_syncs = list(counter.calls)
    mon.close()

    st = hw.open_store(store)
    try:
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
        "pairs": pairs, "a_times": a_times, "b_times": b_times, "phase_wall_s": phase_wall,
        "writer_cpu_per_step_s": writer_cpu_per_step, "hooks_s": hooks_s, "after_backward_s": ab_s,
        "step_s": step_s, "bracket_cost_s": bracket_cost, "hooked_modules": len(hooked),
        "sync_steps": sync_steps, "non_flush_syncs": non_flush_syncs, "flush_syncs": flush_syncs,
        "steps_logged": steps_logged, "scalar_rows": scalar_rows, "layer_rows": layer_rows,
        "load_rows": load_rows, "metrics": metrics, "dropped_rows": mon.dropped_rows,
    }


TASKS = {"overhead": run_overhead}


def jobs(quick: bool, workdir: Path, pairs: int | None = None, batch: int | None = None) -> list[Job]:
    """The child tasks of this benchmark."""
    n = pairs if pairs is not None else (8 if quick else 150)
    params = {"pairs": n, "warmup": 2 if quick else 3, "attrib_steps": 5 if quick else 30,
              "sync_steps": 3 if quick else 10, "workdir": str(workdir), "batch": batch or (2 if quick else BATCH)}
    return [Job("overhead", "benchmarks.bench_overhead", "overhead", params,
                f"hook overhead ({n} A/B pairs)", timeout_s=600 if quick else 3600)]


def section(results: dict[str, dict[str, Any]]) -> Section:
    """Turn the child's raw measurements into budget rows and tables."""
    sec = Section("overhead", "1. Hook overhead on the reference trainer")
    r = results.get("overhead")
    if r is None or "error" in r:
        sec.errors.append((r or {}).get("error", "did not run"))
        sec.budgets.append(Budget("Monitor overhead, all signals, log every step", "≤ 1 %", "error", NA))
        return sec
    a, b = r["a_times"], r["b_times"]
    diffs = [y - x for x, y in zip(a, b)]
    a_med, b_med = median(a), median(b)
    d_med = median(diffs)
    lo, hi = bootstrap_ci(diffs)
    pct = 100 * d_med / a_med
    tm_ratio = trimmed_mean(b) / trimmed_mean(a)
    hooks, ab, st = r["hooks_s"], r["after_backward_s"], r["step_s"]
    in_loop = median([h + x + s for h, x, s in zip(hooks, ab, st)])
    writer = r.get("writer_cpu_per_step_s")
    attributed = in_loop + (writer or 0.0)
    attributed_pct = 100 * attributed / a_med
    spread = percentile(a, 90) / percentile(a, 10) if a else math.nan
    m = r["model"]
    sec.intro = (
        f"Reference trainer `HybridLM` ({len(m['pattern'].split())} blocks `{m['pattern']}` + shared MTP block, "
        f"hidden {m['d_model']}, {m['num_experts']} experts top-{m['top_k']}, vocab {m['vocab_size']}, "
        f"{r['params'] / 1e6:.1f}M parameters, precision {m['precision']}), batch {r['batch']}×{r['seq']} tokens, "
        f"AdamW, torch threads {r['threads']}. Monitor: {r['blocks']} blocks and {r['routers']} routers hooked, "
        f"`log_every=1`, expert load every step, default flush cadence (5 s / 100 steps). "
        f"{r['pairs']} interleaved A/B pairs (A B B A …) of two identical model copies."
    )
    sec.budgets.append(Budget(
        "Monitor overhead, all signals, log every step (A/B, median of paired differences)", "≤ 1 %",
        f"{pct:+.2f} % ({fmt_time(d_med)}/step; 95 % CI {100 * lo / a_med:+.2f} … {100 * hi / a_med:+.2f} %)",
        verdict(pct <= 1.0),
        "noisy when other tenants load the CPU: see the step-time spread below",
    ))
    sec.budgets.append(Budget(
        "Monitor overhead, attributed (time in Monitor code + writer-thread CPU)", "≤ 1 %",
        f"{attributed_pct:.2f} % ({fmt_time(attributed)}/step)", verdict(attributed_pct <= 1.0),
    ))
    syncs = r["non_flush_syncs"]
    sec.budgets.append(Budget(
        "host syncs on non-flush steps", "0", f"{len(syncs)} in {r['sync_steps']} steps", verdict(len(syncs) == 0),
        "" if not syncs else ", ".join(sorted(set(syncs))),
    ))
    sec.tables.append(Table(
        "A/B step times",
        ["", "median step", "p10", "p90", "trimmed mean"],
        [
            ["A: without Monitor", fmt_time(a_med), fmt_time(percentile(a, 10)), fmt_time(percentile(a, 90)),
             fmt_time(trimmed_mean(a))],
            ["B: with Monitor", fmt_time(b_med), fmt_time(percentile(b, 10)), fmt_time(percentile(b, 90)),
             fmt_time(trimmed_mean(b))],
            ["B - A (paired)", fmt_time(d_med), fmt_time(percentile(diffs, 10)), fmt_time(percentile(diffs, 90)),
             fmt_time(trimmed_mean(diffs))],
        ],
        f"Ratio of medians {b_med / a_med:.4f}, ratio of 10 %-trimmed means {tm_ratio:.4f}; "
        f"p90/p10 spread of A's step times {spread:.2f} (1.0 = perfectly quiet machine).",
    ))
    sec.tables.append(Table(
        "Where the Monitor's time goes (per step, measured inside its code)",
        ["part", "median", "p95", "share of step"],
        [
            ["forward hooks (residual RMS, expert counts)", fmt_time(median(hooks)), fmt_time(percentile(hooks, 95)),
             f"{100 * median(hooks) / a_med:.3f} %"],
            ["`after_backward()` (grad norms: one `_foreach_norm`)", fmt_time(median(ab)), fmt_time(percentile(ab, 95)),
             f"{100 * median(ab) / a_med:.3f} %"],
            ["`step()` (incl. the flushes that fell in)", fmt_time(median(st)), fmt_time(percentile(st, 95)),
             f"{100 * median(st) / a_med:.3f} %"],
            ["writer thread CPU (decode + Parquet + self-merge)", fmt_time(writer), "—",
             "—" if writer is None else f"{100 * writer / a_med:.3f} %"],
        ],
        f"Timing hooks cost {fmt_time(r['bracket_cost_s'])} per module and were subtracted. "
        f"Rows written: {r['steps_logged']} steps, {r['scalar_rows']} scalar rows, {r['layer_rows']} layer rows "
        f"({', '.join(r['metrics'])}), {r['load_rows']} expert-load rows, {r['dropped_rows']} dropped. "
        f"Host reads in one flush on the training thread: {len(r['flush_syncs'])} (by design: none needed).",
    ))
    return sec


if __name__ == "__main__":
    raise SystemExit(child_main(TASKS))
