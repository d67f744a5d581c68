"""The :class:`Monitor`: the callback a trainer calls to stream health signals into a store.

This module is the training-thread side of the Monitor's queue. Hot path (``step``, ``log``,
hooks, ``after_backward``): device ops and Python bookkeeping only. Flush (every
``flush_every_s`` seconds or ``flush_every_steps`` steps, and at ``close``): one concatenation
into a flat buffer, the distributed reductions, one non-blocking copy to pinned memory, and a
hand-off through a bounded queue to the writer thread (:mod:`healthwatch.hooks.writer`), which
decodes rows, writes segments, merges them and calls the after-flush objects. Store failures
are logged once and counted as dropped rows; they never reach the training loop.

The Monitor imports neither the alert engine nor the demo: ``alerts=`` is turned into an
after-flush object by the ``"rules"`` factory of :mod:`healthwatch.plugins` (wired in
``healthwatch/__init__``), and adapters come from :func:`healthwatch.hooks.adapters.auto_adapter`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthwatch import plugins
from healthwatch.hooks.adapters import Adapter, ModelSpec, auto_adapter
from healthwatch.hooks.collector import StatsCollector
from healthwatch.hooks.config import MonitorConfig
from healthwatch.hooks.rows import DeadExpertWindow, ExtraMeta, StepMeta
from healthwatch.hooks.writer import (
    AfterFlush,
    Decoder,
    DropCounter,
    FlushItem,
    MonitorWriter,
    RunDeclaration,
    as_after_flush,
    estimate_rows,
)
from healthwatch.schema import check_schema_version, validate_metric_name, validate_run_name
from healthwatch.store import END_EVENT, META_FILE, default_store_path  # END_EVENT == "close"
from healthwatch.store import fs as _store_fs

log = logging.getLogger("healthwatch.monitor")

Number = float | int | torch.Tensor

#: Keyword arguments of ``Monitor(...)`` that are shorthands for :class:`MonitorConfig` fields.
_CONFIG_KWARGS = ("log_every", "expert_load_every", "flush_every_s", "flush_every_steps", "dead_window",
                  "queue_size", "per_rank")


def _is_tensor(v: object) -> bool:
    return isinstance(v, torch.Tensor)


def _refuse_newer_schema(root: Path) -> None:
    """Raise ``NewerSchemaError`` at construction when ``root`` was written by a newer healthwatch.

    Refusing here, before training starts, is the one clear error; found later in the writer
    thread it would only drop every row. An absent or unreadable metadata file is left to the
    writer (which reports it as dropped rows) so that a damaged store never stops a run.
    """
    try:
        meta = json.loads((root / META_FILE).read_text())
        found = meta.get("schema_version") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return
    check_schema_version(found, f"store {root}")


def _after_flush_objects(alerts: Any, after_flush: Sequence[Any] | None, root: Path, run: str) -> list[AfterFlush]:
    """The writer's after-flush objects: the alert evaluator built from ``alerts``, then ``after_flush``."""
    objs: list[AfterFlush] = []
    if alerts is not None:
        if hasattr(alerts, "after_flush"):
            objs.append(alerts)
        else:
            # Rule files are loaded and validated now: a bad rule file is an error at Monitor(...)
            # time, not a warning lost in the writer thread.
            factory = plugins.resolve(plugins.AFTER_FLUSH, "rules")
            objs.append(factory(alerts, root, run))
    objs.extend(as_after_flush(o) for o in (after_flush or ()))
    return objs


class Monitor:
    """Streams per-step, per-layer training-health signals of one run into a healthwatch store.

    Args:
        store: store directory (default ``$HEALTHWATCH_STORE`` or ``./healthwatch-store``).
        run: run name (letters, digits, ``._+-``; becomes a directory name).
        precision: e.g. ``"nvfp4"`` or ``"bf16"``; recorded on the run.
        parent, branch_step, branch_tokens: set for a branch run (e.g. a BF16 ablation).
        config: the run's configuration (hyperparameters…), stored as JSON on the run.
        monitor_config: the Monitor's own knobs (:class:`MonitorConfig`; default ``MonitorConfig()``).
        log_every, expert_load_every, flush_every_s, flush_every_steps, dead_window, queue_size,
            per_rank: shorthands for the :class:`MonitorConfig` fields of the same names; a value
            given here overrides ``monitor_config``'s. A bad value raises ``ValueError``.
        process_group: group for the reductions (default: the world when distributed is initialised).
        attempt: force an attempt number (default: one more than the store holds for this run).
        reason: why this attempt started (``start``, ``resume``, ``rollback``, …).
        start_step: first step of this attempt (default: the first step logged); rows of earlier
            attempts at steps ≥ it are superseded.
        alerts: rules to evaluate after each flush: path(s) or ``"default"`` (built by the alert
            engine, validated now), or any object with ``after_flush(store_root, run)``.
        on_alert: called in the writer thread with each transition (each item an after-flush
            object returns).
        after_flush: more objects with ``after_flush(store_root, run)`` (or plain functions
            ``f(store_root, run)``) called by the writer thread, on rank 0, after each flush is written.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        run: str = "run",
        precision: str = "bf16",
        parent: str | None = None,
        branch_step: int | None = None,
        branch_tokens: int | None = None,
        config: Mapping[str, Any] | None = None,
        log_every: int | None = None,
        expert_load_every: int | None = None,
        flush_every_s: float | None = None,
        flush_every_steps: int | None = None,
        dead_window: int | None = None,
        queue_size: int | None = None,
        process_group: Any = None,
        per_rank: bool | None = None,
        attempt: int | None = None,
        reason: str | None = None,
        start_step: int | None = None,
        alerts: Any = None,
        on_alert: Callable[[Any], None] | None = None,
        after_flush: Sequence[AfterFlush | Callable[[Path, str], Any]] | None = None,
        monitor_config: MonitorConfig | None = None,
    ) -> None:
        if monitor_config is not None and not isinstance(monitor_config, MonitorConfig):
            raise ValueError(f"monitor_config must be a MonitorConfig, got {type(monitor_config).__name__}")
        given = {k: v for k, v in zip(_CONFIG_KWARGS, (log_every, expert_load_every, flush_every_s,
                                                        flush_every_steps, dead_window, queue_size, per_rank))
                 if v is not None}
        self.monitor_config: MonitorConfig = (monitor_config or MonitorConfig()).replace(**given)
        """The Monitor's knobs (validated); ``mon.flush_every_steps = n`` etc. replace fields of it."""
        cfg = self.monitor_config
        self.run = validate_run_name(run)
        if parent is not None:
            validate_run_name(parent)
        if (parent is None) != (branch_step is None) and branch_tokens is None:
            raise ValueError("a branch run needs both parent= and branch_step= (or neither)")
        self.root = Path(default_store_path(store))
        _refuse_newer_schema(self.root)
        self.precision = precision
        self.parent, self.branch_step, self.branch_tokens = parent, branch_step, branch_tokens
        self.config = dict(config or {})
        self.on_alert = on_alert
        after = _after_flush_objects(alerts, after_flush, self.root, self.run)

        self._group = process_group
        self._dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank(process_group) if self._dist else 0
        self.world = torch.distributed.get_world_size(process_group) if self._dist else 1
        self.writes = self.rank == 0
        if self.writes and _store_fs.is_remote(self.root):
            # s3://: bucket, credentials and the If-None-Match probe fail here, before training starts,
            # with one clear error (found later in the writer thread they would only drop rows).
            _store_fs.ensure_writable(self.root)

        self._drops = DropCounter()
        self._closed = False
        self.attempt = attempt if attempt is not None else self._next_attempt()
        self.reason = reason or ("start" if self.attempt == 1 else "resume")
        self.start_step = start_step

        self.spec: ModelSpec | None = None
        self._collector: StatsCollector | None = None
        self._decoder = Decoder.empty()
        self.device = torch.device("cpu")
        self._steps: list[StepMeta] = []
        self._sum_rows: list[torch.Tensor] = []
        self._max_rows: list[torch.Tensor] = []
        self._sum_len = 0
        self._extras: list[ExtraMeta] = []
        self._extra_tensors: list[torch.Tensor] = []
        self._valid_names: set[str] = set()
        self._extra_len = 0
        self._last_step = -1
        self._last_tokens = 0
        self._first_step: int | None = None
        self._last_flush = time.monotonic()
        self._pending_dead_state: dict[str, Any] | None = None
        self._optimizer: Any = None
        self._optim_hook: Any = None
        self._discovery: Any = None
        self._warned_no_optimizer = False

        declaration = RunDeclaration(
            precision=precision, parent=parent, branch_step=branch_step, branch_tokens=self.branch_tokens,
            config=self.config, start_step=start_step, reason=self.reason,
        )
        self.writer = MonitorWriter(
            self.root, self.run, self.attempt, self.rank, self.world, self.writes, declaration, self._drops,
            cfg.expert_load_every, cfg.queue_size, per_rank=cfg.per_rank, after_flush=after, on_alert=on_alert,
        )
        """The writer thread (:class:`healthwatch.hooks.writer.MonitorWriter`) on the far side of the queue."""

    # -- knobs -------------------------------------------------------------------------------
    @property
    def log_every(self) -> int:
        """``monitor_config.log_every``."""
        return self.monitor_config.log_every

    @property
    def expert_load_every(self) -> int:
        """``monitor_config.expert_load_every``."""
        return self.monitor_config.expert_load_every

    @property
    def dead_window(self) -> int:
        """``monitor_config.dead_window``."""
        return self.monitor_config.dead_window

    @property
    def per_rank(self) -> bool:
        """``monitor_config.per_rank``: this rank also writes its own stats as ``<run>.rank<k>``."""
        return self.monitor_config.per_rank

    @property
    def flush_every_s(self) -> float:
        """``monitor_config.flush_every_s``; settable (validated) between steps."""
        return self.monitor_config.flush_every_s

    @flush_every_s.setter
    def flush_every_s(self, value: float) -> None:
        self.monitor_config = self.monitor_config.replace(flush_every_s=value)

    @property
    def flush_every_steps(self) -> int:
        """``monitor_config.flush_every_steps``; settable (validated) between steps."""
        return self.monitor_config.flush_every_steps

    @flush_every_steps.setter
    def flush_every_steps(self, value: int) -> None:
        self.monitor_config = self.monitor_config.replace(flush_every_steps=value)

    @property
    def dropped_rows(self) -> int:
        """Rows lost so far (queue full, store unwritable); also written as ``monitor/dropped_rows``."""
        return self._drops.total

    @property
    def _queue(self) -> Any:
        # Kept for tests that watch the queue drain; the queue belongs to the writer thread.
        return self.writer.queue

    # -- setup -------------------------------------------------------------------------------
    def _next_attempt(self) -> int:
        found = 0
        if self.rank == 0:
            try:
                from healthwatch.store import Store

                if _store_fs.store_exists(self.root):  # a directory, or an s3:// store
                    st = Store(self.root)
                    try:
                        row = st.sql("SELECT max(attempt) FROM attempts WHERE run = ?", [self.run]).fetchone()
                        found = int(row[0]) if row and row[0] is not None else 0
                        if self.parent is not None and self.branch_tokens is None and self.branch_step is not None:
                            tok = st.sql(
                                "SELECT max(tokens) FROM scalars_effective WHERE run = ? AND step <= ?",
                                [self.parent, int(self.branch_step)],
                            ).fetchone()
                            if tok and tok[0] is not None:
                                self.branch_tokens = int(tok[0])
                    finally:
                        st.close()
            except Exception as exc:  # noqa: BLE001 - an unreadable store must not stop training
                self._drops.warn(f"could not read store {self.root} to number the attempt: {exc}")
        if self._dist and self.world > 1:
            box = [found]
            torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(self._group, 0)
                                                    if self._group is not None else 0, group=self._group)
            found = int(box[0])
        return found + 1

    def watch(self, model: nn.Module, adapter: Adapter | None = None, optimizer: Any = None) -> ModelSpec:
        """Attach hooks to ``model`` (adapter picked automatically unless given); returns what was found.

        With ``optimizer``, also :meth:`watch_optimizer` it (update norm and ratio after each step).
        """
        if self._collector is not None:
            self._collector.detach()
        adapter = adapter or auto_adapter(model)
        spec = adapter.inspect(model)
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")
        self.spec = spec
        cfg = self.monitor_config
        self._collector = StatsCollector(spec, self.device, families=cfg.signals, update_every=cfg.update_every,
                                         signals_every=cfg.signals_every, quant_sample_elems=cfg.quant_sample_elems)
        self._collector.attach()
        if optimizer is not None:
            self.watch_optimizer(optimizer)
        elif self._optimizer is None and spec.all_params and "update" in cfg.signals:
            self._discover_optimizer(spec.all_params[0])
        self._decoder = Decoder(
            self._collector.layout, [b.layer_type for b in spec.blocks], [b.residual for b in spec.blocks],
            [b.index for b in spec.blocks],
        )
        if spec.routers:
            experts = [r.num_experts for r in spec.routers]
            # Only the writer thread updates the windows once watching starts (in build_rows).
            self._decoder.dead = DeadExpertWindow(self.dead_window, experts)
            if self.per_rank:
                self._decoder.local_dead = DeadExpertWindow(self.dead_window, experts)
            pending = self._pending_dead_state or {}
            if pending.get("dead"):
                self._decoder.dead.load_state_dict(pending["dead"])
            if pending.get("dead_local") and self._decoder.local_dead is not None:
                self._decoder.local_dead.load_state_dict(pending["dead_local"])
        self.config.setdefault("healthwatch", {}).update(
            {"adapter": spec.adapter, "layers": [b.layer_type for b in spec.blocks],
             "experts": [r.num_experts for r in spec.routers]}
        )
        return spec

    # -- hot path ----------------------------------------------------------------------------
    def _recording(self, step: int) -> bool:
        return step % self.log_every == 0

    def after_backward(self) -> None:
        """Record per-block and special gradient norms; call after backward, before ``optimizer.step()``."""
        if self._collector is not None and self._collector.active:
            self._collector.after_backward()

    def clip_grad_norm_(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """:meth:`after_backward` and :func:`torch.nn.utils.clip_grad_norm_` with one read of the gradients.

        Call it where the trainer clips (after backward, before ``optimizer.step()``), instead of both.
        The per-tensor norms that the Monitor takes for the wgrad signals also give the total norm, so
        the gradients are read once for the norms and once for the scaling, not twice and once. The
        return value and the clipped gradients are those of ``torch.nn.utils.clip_grad_norm_`` (equal
        up to summation order when the gradients are of several dtypes or devices). Anything the shared
        pass does not cover falls back to exactly ``after_backward()`` followed by torch's function:
        ``norm_type`` other than 2, a step the Monitor does not record, parameters whose gradients are
        in ``main_grad`` (megatron) or are tensor subclasses (``DTensor``: sharded, the total needs a
        reduction torch does itself).
        """
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        collector = self._collector
        total = None
        if collector is not None and collector.active and float(norm_type) == 2.0 and params:
            total = collector.after_backward(clip=params)  # None: not shareable, nothing recorded
        if total is None:
            self.after_backward()
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                                  error_if_nonfinite=error_if_nonfinite, foreach=foreach)
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):  # the trainer's own sync
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
                "set `error_if_nonfinite=False`")
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
        return total

    def watch_optimizer(self, optimizer: Any) -> None:
        """Call :meth:`after_optimizer_step` automatically after every ``optimizer.step()`` (a post-step hook).

        The hook runs right after the step, before ``zero_grad`` and before a scheduler changes the
        learning rate, which is what rebuilding the update from Adam's state needs. ``watch(model)``
        does this by itself for the first torch optimizer that steps the model's parameters; an
        explicit :meth:`after_optimizer_step` in the same step is then not computed twice.
        """
        if not hasattr(optimizer, "register_step_post_hook"):
            raise ValueError(f"watch_optimizer needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._optim_hook is not None:
            self._optim_hook.remove()
        self._optimizer = optimizer
        self._optim_hook = optimizer.register_step_post_hook(lambda opt, _args, _kwargs: self.after_optimizer_step(opt))

    def _discover_optimizer(self, probe: torch.Tensor) -> None:
        """Remember the first optimizer that steps ``probe`` (a watched parameter), so that a bare
        ``after_optimizer_step()`` knows it; a global post-step hook removed once it has found it."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def found(opt: Any, _args: Any, _kwargs: Any) -> None:
            # Not removed from here: torch is iterating the global hooks, and removing one while
            # another Monitor's hook is still to come raises "OrderedDict mutated during iteration"
            # inside optimizer.step(). step() removes it once the optimizer is known.
            if self._optimizer is None and any(p is probe for g in opt.param_groups for p in g["params"]):
                # From the next step on its own post-step hook records the update signals; this
                # first step is recorded here, so a trainer needs no call at all.
                self.watch_optimizer(opt)
                self.after_optimizer_step(opt)

        if self._discovery is not None:
            self._discovery.remove()
        self._discovery = register_optimizer_step_post_hook(found)

    def after_optimizer_step(self, optimizer: Any = None) -> None:
        """Record per-block update norm and ``||Δθ|| / ||θ||``; call right after ``optimizer.step()``.

        Call it before ``zero_grad()`` and before the scheduler steps (or use :meth:`watch_optimizer`).
        The update is rebuilt from torch Adam/AdamW state without a copy of the parameters (cost in
        docs/signals.md); other optimizers log a warning once and record nothing. A no-op before
        :meth:`watch`, on unrecorded steps, and when the ``update`` family is off.
        """
        if self._closed or self._collector is None or not self._collector.active:
            return
        optimizer = optimizer if optimizer is not None else self._optimizer
        if optimizer is None:
            # No optimizer has stepped the watched parameters yet (or they are stepped by something
            # that is not a torch optimizer): nothing to read, said once.
            if not self._warned_no_optimizer:
                self._warned_no_optimizer = True
                log.warning("healthwatch: after_optimizer_step(): no optimizer known for the watched model "
                            "(pass it, or watch(model, optimizer=...)); no update signals recorded")
            return
        self._collector.after_optimizer_step(optimizer)

    def quant_stats(self, layer: int | nn.Module, name: str | None, x: torch.Tensor, q: torch.Tensor,
                    amax: torch.Tensor | float | None = None) -> None:
        """Record NVFP4 quantisation health of one GEMM operand: ``x`` before, ``q`` after quantise-dequantise.

        ``layer`` is a watched block's stored layer index or any module inside it; ``name`` the
        operand (``weight``, ``act``, ``grad``, ...), stored as ``fp4_<metric>/<name>`` beside the
        layer aggregate ``fp4_<metric>``. ``amax``: the operand's ``max |x|`` when the quantiser
        already has it (every NVFP4 recipe computes it for the per-tensor scale), stored as given;
        without it the Monitor reads the whole operand once for ``fp4_amax``, the one part of this
        family whose cost grows with the operand (docs/signals.md). Device ops only; a no-op on
        unrecorded steps and when the ``quant`` family is off. Raises ``ValueError`` for a layer
        that is not watched or shapes that differ.
        """
        if self._closed:
            return
        if self._collector is None:
            raise ValueError("quant_stats() before watch(model): the Monitor does not know the layers yet")
        self._collector.quant_stats(self._collector.block_position(layer), name, x, q, amax=amax)

    def attention_logits(self, layer: int | nn.Module, logits: torch.Tensor) -> None:
        """Record ``attn_logit_max``: the largest pre-softmax attention score of a watched block this step.

        For attention implementations that have the scores at hand (eager attention, or a kernel that
        returns each query row's maximum: pass those maxima, the max of them is the same number).
        Fused kernels that never materialise ``q·kᵀ`` have nothing cheap to pass, which is why the
        ``attention`` family is off by default (``MonitorConfig(signals=(..., "attention"))``).
        Device ops only (one ``amax``); a no-op on unrecorded steps, when the family is off, during
        activation recomputation, and before ``watch``. Raises ``ValueError`` for a layer that is not watched.
        """
        if self._closed or self._collector is None:
            return
        self._collector.attention_logits(self._collector.block_position(layer), logits)

    def router_drops(self, layer: int | nn.Module, dropped: Number, routed: Number) -> None:
        """Record ``token_drop_rate`` = dropped / routed token assignments of a capacity-limited MoE layer."""
        if self._closed or self._collector is None:
            return
        self._collector.router_ratio(self._collector.block_position(layer), "token_drop_rate", dropped, routed)

    def step(
        self,
        step: int,
        tokens: int | None = None,
        loss: Number | None = None,
        mtp_losses: Sequence[Number] | None = None,
        lr: Number | None = None,
        **scalars: Number,
    ) -> None:
        """Close one training step: record losses, lr and the hooks' statistics (no host sync)."""
        if self._closed:
            return
        step = int(step)
        tokens = int(tokens) if tokens is not None else step
        self._last_step, self._last_tokens = step, tokens
        if self._discovery is not None and self._optimizer is not None:
            self._discovery.remove()  # the optimizer was found (outside torch's hook iteration here)
            self._discovery = None
        if self._first_step is None:
            self._first_step = step
        collector = self._collector
        recording = self._recording(step)
        if recording:
            named: list[tuple[str, Number]] = []
            if loss is not None:
                named.append(("loss/train", loss))
            for i, v in enumerate(mtp_losses or ()):
                named.append((f"loss/mtp_{i + 1}", v))
            if lr is not None:
                named.append(("lr", lr))
            named.extend(scalars.items())
            dev_names, dev_vals, host = [], [], {}
            for name, v in named:
                if _is_tensor(v):
                    dev_names.append(name)
                    dev_vals.append(v.detach().reshape(-1)[:1].to(self.device, torch.float64))
                else:
                    host[name] = float(v)
            if collector is not None:
                sum_row, max_row, rcalls, rtcalls, has_wgrad = collector.take_row(dev_vals)
            else:
                sum_row = torch.cat(dev_vals) if dev_vals else torch.zeros(0, dtype=torch.float64)
                max_row = torch.zeros(0, dtype=torch.float64, device=sum_row.device)
                rcalls, rtcalls, has_wgrad = [], [], False
            meta = StepMeta(
                step=step, tokens=tokens, wall_time=time.time(), scalar_names=dev_names, host_scalars=host,
                resid_calls=rcalls, router_calls=rtcalls, has_wgrad=has_wgrad,
                sum_offset=self._sum_len, sum_len=sum_row.numel(), max_offset=0,
            )
            self._steps.append(meta)
            self._sum_rows.append(sum_row)
            self._max_rows.append(max_row)
            self._sum_len += sum_row.numel()
        elif collector is not None:
            collector.take_row([])  # discard what hooks gathered on an unrecorded step
        if collector is not None:
            # Hooks run for the *next* step only if it will be recorded.
            collector.active = self._recording(step + 1)
        if self._due():
            self.flush()

    def _due(self) -> bool:
        n = len(self._steps)
        if n >= self.flush_every_steps:
            return True
        if self._dist and self.world > 1:
            return False  # time-based flushes would make ranks reduce at different steps
        return n > 0 and time.monotonic() - self._last_flush >= self.flush_every_s

    def log(self, values: Mapping[str, Number], step: int | None = None, tokens: int | None = None) -> None:
        """Record extra scalars (floats or 0-d/1-element tensors) at ``step`` (default: the last step).

        Invalid names are dropped with one warning and counted, never raised into the loop.
        """
        if self._closed:
            return
        step = self._last_step if step is None else int(step)
        tokens = self._last_tokens if tokens is None else int(tokens)
        dev_names: list[str] = []
        dev_vals: list[torch.Tensor] = []
        host: dict[str, float] = {}
        valid = self._valid_names
        for name, v in values.items():
            if name not in valid:  # the regex costs ~1 µs: check each name once, not every step
                try:
                    validate_metric_name(name)
                except ValueError as exc:
                    self._drops.drop(1, str(exc))
                    continue
                if len(valid) < 100_000:
                    valid.add(name)
            if _is_tensor(v):
                dev_names.append(name)
                dev_vals.append(v)
            else:
                host[name] = float(v)
        if dev_vals:
            # One device op for the whole dict (per-tensor ops cost ~0.5 µs each on the host).
            self._extra_tensors.append(self._stack_values(dev_vals))
        self._extras.append(ExtraMeta(step, tokens, time.time(), dev_names, host, self._extra_len))
        self._extra_len += len(dev_names)

    def _stack_values(self, values: list[torch.Tensor]) -> torch.Tensor:
        """First element of each tensor as one new float64 tensor on the Monitor's device (no sync)."""
        with torch.no_grad():
            try:
                flat = torch.stack(values) if values[0].dim() == 0 else None
            except RuntimeError:  # mixed shapes or devices: fall back to one op per tensor
                flat = None
            if flat is None or flat.dim() != 1:
                return torch.cat([v.detach().reshape(-1)[:1].to(self.device, torch.float64) for v in values])
            return flat.to(self.device, torch.float64)

    def event(self, kind: str, step: int | None = None, message: str = "", tokens: int | None = None) -> None:
        """Record an event (``checkpoint``, ``rollback``, ``note``, …); written at once by the writer thread."""
        if self._closed or not self.writes:
            return
        rec = {
            "attempt": self.attempt,
            "step": self._last_step if step is None else int(step),
            "tokens": self._last_tokens if tokens is None else int(tokens),
            "kind": str(kind)[:100],
            "message": str(message)[:10_000],
            "wall_time": time.time(),
        }
        self.writer.put(FlushItem(torch.zeros(0), None, [], [], 0, [rec], self._decoder, self._first_step), rows=1)

    # -- flush -------------------------------------------------------------------------------
    def flush(self, wait: bool = False) -> None:
        """Hand everything recorded so far to the writer thread (``wait`` blocks until written)."""
        self._last_flush = time.monotonic()
        steps, extras = self._steps, self._extras
        if not steps and not extras and not wait:
            return
        if steps:
            # Wall-clock heartbeat, one per flush: how stalls are told from slow steps (docs/signals.md).
            steps[-1].host_scalars["monitor/heartbeat"] = time.time()
        parts = self._sum_rows + self._max_rows + self._extra_tensors
        n_sum = self._sum_len
        max_offset = n_sum
        for meta, row in zip(steps, self._max_rows):
            meta.max_offset = max_offset
            max_offset += row.numel()
        extras_offset = max_offset
        self._steps, self._sum_rows, self._max_rows, self._sum_len = [], [], [], 0
        self._extras, self._extra_tensors, self._extra_len = [], [], 0
        if parts:
            flat = torch.cat([p.to(self.device) for p in parts]) if len(parts) > 1 else parts[0].clone()
        else:
            flat = torch.zeros(0, dtype=torch.float64)
        # per_rank: keep this rank's own statistics before the in-place reduction (a device copy, no sync).
        local = flat.clone() if self.per_rank and steps else None
        if self._dist and self.world > 1 and steps:
            torch.distributed.all_reduce(flat[:n_sum], op=torch.distributed.ReduceOp.SUM, group=self._group)
            torch.distributed.all_reduce(flat[n_sum:extras_offset], op=torch.distributed.ReduceOp.MAX, group=self._group)
        event = None
        if flat.is_cuda:
            flat = self._to_pinned(flat)
            if local is not None:
                local = self._to_pinned(local)
            event = torch.cuda.Event()
            event.record()
        item = FlushItem(flat, event, steps, extras, extras_offset, [], self._decoder, self._first_step, local,
                         threading.Event() if wait else None)
        if self.writes or local is not None:
            self.writer.put(item, rows=estimate_rows(steps, extras, self._decoder),
                            block_s=self.monitor_config.close_timeout_s if wait and self.writer.is_alive() else 0.0)
        elif item.done is not None:
            item.done.set()  # nothing queued on a non-writing rank: waiting would only hit the timeout
        if item.done is not None and self.writer.is_alive():
            item.done.wait(timeout=self.monitor_config.close_timeout_s)

    @staticmethod
    def _to_pinned(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    # -- lifecycle ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Monitor state to save with a checkpoint (trailing dead-expert windows, counters)."""
        self.flush(wait=True)
        return {
            "run": self.run,
            "attempt": self.attempt,
            "last_step": self._last_step,
            "last_tokens": self._last_tokens,
            "dropped_rows": self.dropped_rows,
            "dead": self._decoder.dead.state_dict() if self._decoder.dead is not None else None,
            "dead_local": self._decoder.local_dead.state_dict() if self._decoder.local_dead is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict` (a resume keeps dead-expert windows intact)."""
        with self._drops._lock:
            self._drops.total = self._drops.reported = int(state.get("dropped_rows", 0))
        windows = {"dead": self._decoder.dead, "dead_local": self._decoder.local_dead}
        pending = {}
        for key, window in windows.items():
            saved = state.get(key)
            if not saved:
                continue
            if window is not None:
                window.load_state_dict(saved)
            else:  # not watching yet: applied by watch()
                pending[key] = dict(saved)
        self._pending_dead_state = pending or None

    def close(self) -> None:
        """Flush everything, stop the writer thread and remove the hooks. Idempotent."""
        if self._closed:
            return
        try:
            if self._first_step is not None:
                # Says "finished", so that stall rules never take a closed run for a hung one.
                # Readers (healthwatch.query.runs) show the run as finished, not live.
                self.event(END_EVENT, message="monitor closed")
            self.flush(wait=True)
        finally:
            self._closed = True
            if self._collector is not None:
                self._collector.detach()
            for attr in ("_optim_hook", "_discovery"):
                handle = getattr(self, attr)
                if handle is not None:
                    handle.remove()
                    setattr(self, attr, None)
            self.writer.stop(self.monitor_config.close_timeout_s)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass
