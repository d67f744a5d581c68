"""Test-only shims that let megatron-core 0.16 train a tiny model on CPU with gloo.

megatron-core assumes CUDA in a handful of places that have nothing to do with what healthwatch
hooks (routers, layers, gradients). Each shim below names the assumption it papers over. They
are applied by :func:`install` in the test processes only; nothing in ``healthwatch`` uses them.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from typing import Any

import torch


class _Stream:
    """Stand-in for ``torch.cuda.Stream``/``current_stream()``: everything is already ordered on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        """No-op."""

    def wait_event(self, *args: Any) -> None:
        """No-op."""

    def record_event(self, *args: Any) -> _Event:
        """A completed event."""
        return _Event()

    def synchronize(self) -> None:
        """No-op."""

    def query(self) -> bool:
        """Always done."""
        return True


class _Event(_Stream):
    """Stand-in for ``torch.cuda.Event``."""

    def record(self, *args: Any) -> None:
        """No-op."""

    def elapsed_time(self, *args: Any) -> float:
        """Zero."""
        return 0.0


class _RNGTracker:
    """Stand-in for megatron's CUDA RNG tracker (``fork()`` uses the CPU generator as is)."""

    def __init__(self) -> None:
        self.states_: dict[str, Any] = {}

    def reset(self) -> None:
        """Forget all states."""
        self.states_ = {}

    def is_initialized(self) -> bool:
        """Always usable."""
        return True

    def get_states(self) -> dict[str, Any]:
        """The (empty) states."""
        return dict(self.states_)

    def set_states(self, states: dict[str, Any]) -> None:
        """Keep states (never used on CPU)."""
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        """Record a named seed."""
        self.states_[name] = seed

    @contextlib.contextmanager
    def fork(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Run the block with the default CPU generator."""
        yield


def _cpu(device: Any) -> Any:
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # a bare int device means a CUDA ordinal
    return device


class CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites ``device="cuda"`` (factory functions, ``.to``) to CPU: several megatron code paths
    hard-code CUDA (the default causal mask, optimizer state, bucket buffers)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if getattr(func, "__name__", "") in ("to", "cuda") and args:
            if func.__name__ == "cuda":
                return args[0]
            args = (args[0], *(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args[1:]))
        return func(*args, **kwargs)


_TRACKER = _RNGTracker()
_INSTALLED = False
_MODE: CudaToCpu | None = None


def _get_tracker(*args: Any, **kwargs: Any) -> _RNGTracker:
    return _TRACKER


def _replace_everywhere(name: str, original: Any, replacement: Any) -> None:
    """Replace ``name`` in every megatron module that imported ``original`` by name."""
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("megatron"):
            continue
        if getattr(mod, name, None) is original:
            setattr(mod, name, replacement)


def install() -> None:
    """Apply every shim (idempotent). Call before building a megatron model."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return
    _INSTALLED = True
    _MODE = CudaToCpu()
    _MODE.__enter__()  # stays active for the life of the test process
    cuda = torch.cuda
    # Streams/events: the token dispatchers and DDP create side streams at construction.
    cuda.Stream = _Stream  # type: ignore[misc,assignment]
    cuda.Event = _Event  # type: ignore[misc,assignment]
    cuda.current_stream = lambda *a, **k: _Stream()  # type: ignore[assignment]
    cuda.default_stream = lambda *a, **k: _Stream()  # type: ignore[assignment]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # Buffers allocated with device=torch.cuda.current_device() (trackers, DDP buckets) go to CPU.
    cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    cuda.nvtx.range_push = lambda *a, **k: None  # type: ignore[assignment]
    cuda.nvtx.range_pop = lambda *a, **k: None  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mrandom

    # The CUDA RNG tracker forks CUDA generator states for dropout/initialisation.
    _replace_everywhere("get_cuda_rng_tracker", mrandom.get_cuda_rng_tracker, _get_tracker)
    mrandom.get_cuda_rng_tracker = _get_tracker
    mrandom.model_parallel_cuda_manual_seed = lambda seed, *a, **k: torch.manual_seed(seed)

    # The alltoall dispatcher moves its split sizes to the host with a CUDA stream sync it skips on
    # CPU, so they arrive as tensors/NumPy ints, which the c10d binding refuses: make them ints.
    dist = torch.distributed
    original_a2a = dist.all_to_all_single

    def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_split_sizes: Any = None,
                          input_split_sizes: Any = None, *args: Any, **kwargs: Any) -> Any:
        def ints(sizes: Any) -> Any:
            if sizes is None:
                return None
            if isinstance(sizes, torch.Tensor):
                return [int(x) for x in sizes.tolist()]
            return [int(x) for x in sizes]

        return original_a2a(output, input, ints(output_split_sizes), ints(input_split_sizes), *args, **kwargs)

    dist.all_to_all_single = all_to_all_single

    from megatron.core.transformer import torch_norm

    # Without Transformer Engine or Apex, megatron's torch norm refuses sequence parallelism only
    # because it does not tag its parameters; tag them as the fused norms do (``sequence_parallel``),
    # so that finalize_model_grads all-reduces their gradients over the tensor-parallel group.
    original_norm_new = torch_norm.WrappedTorchNorm.__new__

    def norm_new(cls: type, config: Any, hidden_size: int, *args: Any, **kwargs: Any) -> Any:
        if not getattr(config, "sequence_parallel", False):
            return original_norm_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_norm_new(cls, plain, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = norm_new  # type: ignore[method-assign]

    from megatron.core.transformer.moe import moe_utils

    # 0.16.1 without Transformer Engine never defines this name, yet the router's gating linear
    # reads it (NameError); None selects its plain torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
