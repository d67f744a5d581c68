"""The hot path makes no host syncs: on non-flush steps no code of the ``healthwatch.hooks`` package
reads a tensor back to the host.

Coverage is generic, not a list of entry points: every host-reading tensor method and function is
wrapped for whole real training steps of the reference model (forward, backward, optimizer step,
all signals on, every step logged), and a call counts when *any* frame on the training thread's
stack lies in the installed ``healthwatch.hooks`` package directory. Forward hooks (residual,
router counts and health, Mamba dt, NVFP4 quantisation observers), ``after_backward`` and
``clip_grad_norm_`` (on alternate steps),
``after_optimizer_step`` (explicit and the optimizer's post-step hook), ``step``, ``log``, and any hook added later (including code they call in
other packages) are therefore covered without being named here. The writer thread is exempt: it
decodes on the host by design, after the flush's one copy.

On CUDA the same property is checked with ``torch.cuda.set_sync_debug_mode("error")`` by
``scripts/gpu_check.py``; this CPU test backs it, as the sync debug mode misses some syncs.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import healthwatch as hw
import healthwatch.hooks
from healthwatch.demo.data import SyntheticTokens
from healthwatch.demo.model import HybridConfig, HybridLM

#: Every signal family, sampled at every step (the defaults sample some every 100th step only).
ALL_FAMILIES = hw.MonitorConfig(signals=("quant", "router", "mamba", "update", "attention"), signals_every=1)
#: One metric of each family that must be stored for every step, so the check is not vacuous.
FAMILY_METRICS = ("fp4_underflow", "router_entropy", "ssm_dt_mean", "ssm_decay_min", "update_ratio",
                  "resid_rms", "wgrad_norm", "maxvio")

#: Everything under here is "the Monitor's own code", whatever the module names inside it.
HOOKS_DIR = str(Path(healthwatch.hooks.__file__).resolve().parent) + "/"

#: Tensor methods that read device data on the host (or, on CUDA, wait for the device to size
#: their output): scalar/array conversions, copies to CPU, formatting, and data-dependent shapes.
TENSOR_METHODS = (
    "item", "tolist", "cpu", "numpy", "__array__",
    "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "__repr__", "__format__",
    "nonzero", "unique", "unique_consecutive", "bincount", "masked_select", "repeat_interleave",
    "equal", "allclose",
)
#: The same operations reached as ``torch.<name>`` functions.
TORCH_FUNCTIONS = (
    "nonzero", "unique", "unique_consecutive", "bincount", "masked_select", "repeat_interleave",
    "equal", "allclose", "argwhere",
)


class HostReadCounter:
    """Counts host-reading tensor calls made, directly or through callees, from ``healthwatch.hooks``.

    ``calls`` holds ``(operation, innermost hooks frame)`` pairs. Only the thread that entered the
    counter is watched (the Monitor's writer thread reads on the host by design).
    """

    def __init__(self, root: str = HOOKS_DIR) -> None:
        self.root = root
        self.calls: list[tuple[str, str]] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._tid = 0
        self._busy = False  # no re-entry: a wrapped method may call another wrapped one

    def _hooks_frame(self) -> str | None:
        f = sys._getframe(2)
        while f is not None:
            fn = f.f_code.co_filename
            if fn.startswith(self.root):
                return f"{Path(fn).name}:{f.f_lineno} in {f.f_code.co_name}"
            f = f.f_back
        return None

    def _wrap(self, owner: Any, name: str) -> None:
        orig = getattr(owner, name, None)
        if orig is None:
            return
        counter = self

        def wrapper(*a: Any, **k: Any) -> Any:
            if counter._busy or threading.get_ident() != counter._tid:
                return orig(*a, **k)
            counter._busy = True  # count the outermost call only (e.g. not item() inside __format__)
            try:
                where = counter._hooks_frame()
                if where is not None:
                    counter.calls.append((name, where))
                return orig(*a, **k)
            finally:
                counter._busy = False

        self._saved.append((owner, name, orig))
        setattr(owner, name, wrapper)

    def __enter__(self) -> HostReadCounter:
        self._tid = threading.get_ident()
        for name in TENSOR_METHODS:
            self._wrap(torch.Tensor, name)
        for name in TORCH_FUNCTIONS:
            self._wrap(torch, name)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()


def _optional_hooks(mon: hw.Monitor, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[Callable[[], None]]:
    """Calls of Monitor hooks that exist only in newer versions (optimizer updates, quantisation
    statistics, token drops), so that they are covered as soon as they land."""
    calls: list[Callable[[], None]] = []
    after_opt = getattr(mon, "after_optimizer_step", None)
    if callable(after_opt):
        required = [p for p in inspect.signature(after_opt).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        calls.append((lambda: after_opt(opt)) if required else after_opt)
    quant = getattr(mon, "quant_stats", None)
    if callable(quant):
        weight = next(p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
        # A stand-in quantiser output: what matters is that the hook reads it without syncing.
        calls.append(lambda: quant(0, "weight", weight.detach(), weight.detach().half().float()))
    attention = getattr(mon, "attention_logits", None)
    if callable(attention):
        weight = next(p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
        # Stand-in scores: what matters is that the hook folds their max in without syncing.
        calls.append(lambda: attention(0, weight.detach() @ weight.detach().T))
    drops = getattr(mon, "router_drops", None)
    if callable(drops) and mon.spec is not None and mon.spec.routers:
        layer = mon.spec.blocks[mon.spec.routers[0].layer].index
        routed = torch.tensor(64.0)
        calls.append(lambda: drops(layer, routed * 0.25, routed))
    return calls


@contextmanager
def _flush_marker(mon: hw.Monitor) -> Iterator[list[int]]:
    """Counts the Monitor's flushes (a flush may read on the host; its step is not checked)."""
    flushes: list[int] = []
    orig = mon.flush

    def flush(*a: Any, **k: Any) -> Any:
        flushes.append(1)
        return orig(*a, **k)

    mon.flush = flush  # type: ignore[method-assign]
    try:
        yield flushes
    finally:
        mon.flush = orig  # type: ignore[method-assign]


def _train(store_dir: Path, steps: int, flush_every: int,
           patch: Callable[[hw.Monitor], None] | None = None) -> tuple[list[list[tuple[str, str]]], list[bool], list[float], hw.Monitor]:
    """Train the reference model (NVFP4, MoE, Mamba, attention, 2 MTP heads) with every signal on.

    Returns per step: the hooks package's host reads, whether the step flushed; and the losses.
    """
    torch.manual_seed(0)
    cfg = HybridConfig()  # the demo model: Mamba-2, attention and MoE blocks, NVFP4, 2 MTP heads
    model = HybridLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = SyntheticTokens(cfg.vocab_size, 32, 2, seed=0)
    # Every signal family on and sampled at every step: their hooks (quant observers, router
    # health, dt, decay, the optimizer post-step hook) run on the non-flush steps checked here.
    mon = hw.Monitor(store=store_dir, run="nosync", log_every=1, expert_load_every=1,
                     flush_every_steps=flush_every, flush_every_s=1e9, monitor_config=ALL_FAMILIES)
    spec = mon.watch(model)
    assert spec.routers and any(b.layer_type == "mamba" for b in spec.blocks)
    if patch is not None:
        patch(mon)
    extra = _optional_hooks(mon, model, opt)
    per_step: list[list[tuple[str, str]]] = []
    flushed: list[bool] = []
    losses: list[float] = []
    for step in range(steps):
        ids = data.batch_at(step)
        with _flush_marker(mon) as flushes, HostReadCounter() as counter:
            out = model(ids)
            out.total_loss.backward()
            if step % 2:  # the reference trainer's path: wgrad norms and clipping in one pass
                mon.clip_grad_norm_(model.parameters(), 1.0)
            else:
                mon.after_backward()
            opt.step()
            for call in extra:
                call()
            opt.zero_grad(set_to_none=True)
            mon.step(step, tokens=(step + 1) * ids.numel(), loss=out.loss, mtp_losses=out.mtp_losses, lr=1e-3)
            mon.log({"opt/update_rms": out.aux_loss.detach()}, step=step)
        per_step.append(counter.calls)
        flushed.append(bool(flushes))
        losses.append(float(out.loss.detach()))
    return per_step, flushed, losses, mon


def test_no_host_reads_on_non_flush_steps(store_dir: Path) -> None:
    steps, flush_every = 7, 3
    per_step, flushed, losses, mon = _train(store_dir, steps, flush_every)
    mon.close()
    # The cadence really produced flush and non-flush steps, so the check below is not vacuous.
    assert flushed == [(s + 1) % flush_every == 0 for s in range(steps)]
    bad = {s: calls for s, calls in enumerate(per_step) if not flushed[s] and calls}
    assert bad == {}, f"host reads from healthwatch.hooks on non-flush steps: {bad}"
    # The Monitor still recorded what it was given (the counter did not disturb the run).
    st = hw.open_store(store_dir)
    stored = [v for (v,) in st.sql("SELECT value FROM scalars WHERE run='nosync' AND name='loss/train' "
                                   "ORDER BY step").fetchall()]
    assert stored == pytest.approx(losses, rel=1e-6)
    # Every family's hooks ran on every step, the non-flush ones included (each stored its metric).
    per_metric = dict(st.sql("SELECT metric, count(DISTINCT step) FROM layer_stats WHERE run='nosync' "
                             "GROUP BY metric").fetchall())
    st.close()
    assert {m: per_metric.get(m, 0) for m in FAMILY_METRICS} == {m: steps for m in FAMILY_METRICS}


def test_counter_sees_a_host_read_injected_into_a_forward_hook(store_dir: Path) -> None:
    """The check can fail: an ``.item()`` added to a router forward hook is counted on every step."""
    injected: list[int] = []
    hook_names: set[str] = set()

    def patch(mon: hw.Monitor) -> None:
        router = mon.spec.routers[0]
        original = router.extract

        def extract(module: torch.nn.Module, inputs: tuple, output: object) -> torch.Tensor:
            decision = original(module, inputs, output)
            injected.append(int(decision.max().item()))  # the host read under test
            return decision

        # The collector's router forward hook (inside healthwatch.hooks) looks the extractor up on
        # each call, so the injected read runs inside that hook.
        router.extract = extract
        hook_names.update(h.__code__.co_name for h in router.module._forward_hooks.values()
                          if h.__code__.co_filename.startswith(HOOKS_DIR))

    steps = 3
    per_step, flushed, _, mon = _train(store_dir, steps, flush_every=1000, patch=patch)
    mon.close()
    assert not any(flushed)
    assert injected, "the patched router hook never ran"
    assert len(hook_names) == 1, hook_names  # the forward hook healthwatch registered on the router
    (hook_name,) = hook_names
    for calls in per_step:
        assert calls and all(op == "item" and where.endswith(f" in {hook_name}") for op, where in calls), calls
    # One count per injected read: nothing missed, nothing counted twice.
    assert sum(len(c) for c in per_step) == len(injected)


def test_counter_ignores_host_reads_outside_the_hooks_package() -> None:
    """Host reads by the model or the training loop are not the Monitor's and are not counted."""
    with HostReadCounter() as counter:
        t = torch.arange(4.0)
        assert t.sum().item() == 6.0
        assert bool(t.any())
    assert counter.calls == []
