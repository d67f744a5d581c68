"""Adapter for megatron-core ``GPTModel`` and ``MambaModel`` (extra ``[megatron]``).

Written against megatron-core 0.16.1 (the newest release that installs on Python 3.11; 0.17+
needs Python ≥ 3.12) and checked on CPU with gloo in ``tests/integrations/test_megatron.py``.

What it finds, per pipeline stage (each stage describes only the layers it holds):

* blocks ``decoder.layers[i]`` with their **global** index ``layer.layer_number - 1`` (megatron
  numbers layers from 1 across all stages), typed ``moe`` (the layer's ``mlp`` is a
  ``MoELayer``), ``mamba`` (``MambaLayer``), ``mlp`` (``MLPLayer`` of a hybrid stack) or
  ``attention`` (a GPT layer with a dense MLP, or an attention-only layer of a hybrid stack);
* MTP blocks ``mtp.layers[j]`` (type ``mtp``, indices after the decoder's);
* routers ``…mlp.router`` (``TopKRouter``), whose ``forward`` returns ``(probs, routing_map)``
  with ``routing_map`` a bool ``[tokens, experts]`` map over *all* experts, so its column sums
  are the expert counts of the tokens this rank routed;
* parameter groups ``output`` (``output_layer``), ``embedding`` and ``mtp``.

Gradients come from ``param.main_grad`` (megatron's DDP keeps them there; ``param.grad`` is None),
read by the Monitor after ``forward_backward_func`` returns (after ``finalize_model_grads``).

Distributed use: create the Monitor with ``process_group=stage_process_group()`` (tensor ×
data × context parallel ranks of this pipeline stage): its SUM all-reduce then adds up the
expert counts of every data/expert/sequence-parallel rank, and every stage's first rank writes
its own layers. Because tensor- and expert-parallel parameters are split across ranks of that
group, the spec carries ``grad_scale`` factors (shards per parameter) so that the group-mean of
squared norms the Monitor computes equals the full parameter's squared norm.

Pipeline parallelism: each stage's Monitor sees only its own layers, so a stage's
``grad_norm/total`` and ``grad_norm/embedding`` alone would be partial (the first stage holds the
word embeddings, a last stage with MTP its own position embeddings). The spec therefore carries
one stand-in "parameter" per such group whose gradient norm is the other stages' share, obtained
with one small SUM all-reduce over the pipeline group inside ``after_backward`` (device tensors
only, no host sync): every stage then holds the global value, as megatron's own grad norm does,
and only the first stage writes it (``ModelSpec.recorded_elsewhere`` on the others), so the run has
one ``grad_norm/total`` row per step. Log ``lr`` and losses from the last stage only.

Tensor parallelism: megatron trains MoE with tensor parallelism only together with sequence
parallelism (it refuses the combination otherwise), so each tensor-parallel rank routes its own
slice of the sequence and the SUM over the stage group counts every token once.

MTP losses: megatron accumulates each head's unscaled loss per microbatch in
``MTPLossLoggingHelper.tracker["values"]``; :func:`mtp_losses` reads them (divided by the
number of microbatches) as device tensors, without a host sync.

Importing this module never imports megatron: a model is recognised by its class's module name,
so environments without megatron-core simply never match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from healthwatch.hooks.adapters.base import (
    BlockSpec,
    ModelSpec,
    RouterSpec,
    UnsupportedModelError,
    output_item,
    params_by_block,
    register_adapter,
)

_WRAPPERS = ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel", "DataParallel")
_MODELS = ("GPTModel", "MambaModel", "HybridModel")


def _is_megatron(module: nn.Module) -> bool:
    return type(module).__module__.startswith("megatron.")


def unwrap(model: nn.Module) -> nn.Module:
    """The ``GPTModel``/``MambaModel`` inside megatron's DDP / Float16Module wrappers."""
    for _ in range(8):
        if type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def model_chunks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The model chunks of this rank: one, or several with virtual pipeline parallelism
    (pass megatron's list of chunks as an ``nn.ModuleList``)."""
    if isinstance(model, (list, tuple, nn.ModuleList)):
        return [unwrap(m) for m in model]
    return [unwrap(model)]


def _is_identity(module: Any) -> bool:
    return module is None or type(module).__name__ in ("IdentityOp", "IdentityFuncOp", "Identity")


def _own(p: nn.Parameter) -> bool:
    # megatron marks the copy of the word embeddings that a later pipeline stage keeps (for a tied
    # output layer or MTP) with ``shared``; like its own grad norm, count it on the first stage only.
    return p.requires_grad and not getattr(p, "shared", False)


def layer_type(layer: nn.Module) -> str:
    """healthwatch type of a megatron decoder layer (see the module docstring)."""
    name = type(layer).__name__
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and type(mlp).__name__ == "MoELayer":
        return "moe"
    mixer = getattr(layer, "mixer", None)
    if "Mamba" in name or (isinstance(mixer, nn.Module) and "Mamba" in type(mixer).__name__):
        return "mamba"
    if name == "MLPLayer" or (_is_identity(getattr(layer, "self_attention", None)) and not _is_identity(mlp)):
        return "mlp"
    return "attention"


def find_router(module: nn.Module) -> nn.Module | None:
    """The ``TopKRouter`` of a layer's ``MoELayer`` (``mlp.router``), if any."""
    mlp = getattr(module, "mlp", None)
    if mlp is None and hasattr(module, "transformer_layer"):  # an MTP layer wraps a transformer layer
        mlp = getattr(module.transformer_layer, "mlp", None)
    router = getattr(mlp, "router", None)
    return router if isinstance(router, nn.Module) else None


def _parallel_state() -> Any:
    """megatron's ``parallel_state`` when its model-parallel groups are set up, else None."""
    try:
        from megatron.core import parallel_state as ps

        return ps if ps.model_parallel_is_initialized() else None
    except (ImportError, AssertionError, AttributeError):
        return None


def _grad_of(p: Any) -> torch.Tensor | None:
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


class PipelinePeers(torch.Tensor):
    """A stand-in parameter whose "gradient" carries the squared gradient norm that the *other*
    pipeline stages hold for one parameter group (all parameters, or the embeddings).

    Reading :attr:`main_grad` (the collector does, once per recorded ``after_backward``) computes
    this rank's scaled squared norm ``q`` of the group, SUM-all-reduces it over the pipeline group
    (this rank's peers at the same position of every stage) and returns ``[sqrt(sum - q)]``.
    Summed over a stage's group and divided by its size, as the Monitor does, the stage's record
    then equals the sum over all stages, i.e. the global norm. Every stage must read it at the
    same steps (all stages call ``after_backward`` at the same steps, as the Monitor requires).

    It is a one-element zero tensor, so code that treats the watched parameters as tensors (norms
    of the weights for update ratios) sees a parameter of norm zero that no optimizer steps.
    """

    @staticmethod
    def __new__(cls, params: Sequence[nn.Parameter], scales: dict[int, float], group: Any,
                name: str) -> PipelinePeers:
        """Build the stand-in for ``params`` (this stage's part of the group)."""
        device = next((p.device for p in params), torch.device("cpu"))
        self = torch.Tensor._make_subclass(cls, torch.zeros(1, device=device))
        self._hw_params = list(params)
        self._hw_weights = torch.tensor([scales.get(id(p), 1.0) for p in params], dtype=torch.float64, device=device)
        self._hw_group = group
        self._hw_group_name = name
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything is set up in __new__

    # Operations on it give plain tensors (it is only a carrier of main_grad).
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def main_grad(self) -> torch.Tensor:
        """``[sqrt(other stages' scaled squared norm of the group)]`` as a device tensor (no host sync)."""
        grads, keep = [], []
        for i, p in enumerate(self._hw_params):
            g = _grad_of(p)
            if g is not None:
                grads.append(g)
                keep.append(i)
        dev = self.device
        with torch.no_grad():
            if grads:
                norms = torch.stack(torch._foreach_norm(grads)).to(dev, torch.float64)
                w = self._hw_weights if len(keep) == len(self._hw_params) else self._hw_weights[keep]
                q = (norms.pow(2) * w).sum().reshape(1)
            else:
                q = torch.zeros(1, dtype=torch.float64, device=dev)
            total = q.clone()
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=self._hw_group)
            return (total - q).clamp_min(0).sqrt().float()


def _parallel_sizes() -> tuple[int, int, int]:
    """(tensor, expert, expert-tensor) parallel sizes; 1s when megatron's parallel state is not set up."""
    try:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return 1, 1, 1
        return (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
                ps.get_expert_tensor_parallel_world_size() or 1)
    except (ImportError, AssertionError, AttributeError):
        return 1, 1, 1


def grad_scales(params: Sequence[nn.Parameter]) -> dict[int, float]:
    """Shards per parameter within the stage group: the factor that turns the group-mean of a
    parameter's squared gradient norm into the squared norm of the whole parameter.

    A tensor-parallel weight (``tensor_model_parallel``) is split over TP ranks; an expert weight
    (``allreduce = False``) over expert-parallel ranks (and expert-tensor-parallel ranks when it
    is also tensor-parallel). Replicated parameters (norms, routers) need no factor.
    """
    tp, ep, etp = _parallel_sizes()
    scales: dict[int, float] = {}
    for p in params:
        split = bool(getattr(p, "tensor_model_parallel", False))
        if not getattr(p, "allreduce", True):
            shards = ep * (etp if split else 1)
        else:
            shards = tp if split else 1
        if shards != 1:
            scales[id(p)] = float(shards)
    return scales


def stage_process_group() -> Any:
    """The process group to give the Monitor under megatron: tensor × data × context parallel
    ranks of this pipeline stage (all ranks that see different tokens or hold different shards
    of this stage's layers)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


def mtp_losses(num_microbatches: int | None = None, reset: bool = False) -> list[torch.Tensor]:
    """Each MTP head's unscaled loss of the last step, as device tensors (no host sync).

    megatron sums per-microbatch losses into ``MTPLossLoggingHelper.tracker["values"]`` and its
    ``training_log`` clears them each iteration; call this before that (or pass ``reset=True``
    when your loop never calls megatron's ``training_log``). ``num_microbatches`` defaults to
    megatron's microbatch calculator when it is set up, else 1.
    """
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("values")
    if values is None:
        return []
    if num_microbatches is None:
        try:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            num_microbatches = get_num_microbatches()
        except Exception:  # noqa: BLE001 - the calculator is only set up by megatron's training loop
            num_microbatches = 1
    losses = values.detach() / max(1, int(num_microbatches))
    if reset:
        values.zero_()
    return list(losses.unbind(0))


class MegatronAdapter:
    """Describes a megatron-core ``GPTModel``/``MambaModel`` (one pipeline stage, any chunks)."""

    name = "megatron"

    def matches(self, model: nn.Module) -> bool:
        """True for megatron-core GPT/Mamba models, wrapped or not, or a ModuleList of their chunks."""
        try:
            chunks = model_chunks(model)
        except Exception:  # noqa: BLE001 - anything odd is simply not ours
            return False
        return bool(chunks) and all(_is_megatron(c) and type(c).__name__ in _MODELS for c in chunks)

    def inspect(self, model: nn.Module) -> ModelSpec:
        """Blocks with global indices, routers reading the routing map, and parameter groups."""
        chunks = model_chunks(model)
        entries: list[tuple[int, str, nn.Module, str]] = []
        mtp_entries: list[tuple[int, nn.Module, str]] = []
        num_layers = 0
        for c, chunk in enumerate(chunks):
            prefix = f"chunk{c}." if len(chunks) > 1 else ""
            config = getattr(chunk, "config", None)
            num_layers = int(getattr(config, "num_layers", 0) or 0)
            decoder = getattr(chunk, "decoder", None)
            for i, layer in enumerate(getattr(decoder, "layers", []) or []):
                number = getattr(layer, "layer_number", None)
                index = int(number) - 1 if isinstance(number, int) else i
                entries.append((index, layer_type(layer), layer, f"{prefix}decoder.layers.{i}"))
            mtp = getattr(chunk, "mtp", None)
            for j, layer in enumerate(getattr(mtp, "layers", []) or []):
                number = getattr(layer, "layer_number", j + 1)  # MTP layers are numbered from 1
                mtp_entries.append((int(number) - 1, layer, f"{prefix}mtp.layers.{j}"))
        if not entries and not mtp_entries:
            raise UnsupportedModelError(
                f"{type(chunks[0]).__name__}: no layers found at decoder.layers or mtp.layers "
                "(is this pipeline stage empty?)"
            )
        blocks: list[BlockSpec] = []
        routers: list[RouterSpec] = []
        stack = [(idx, typ, mod, nm) for idx, typ, mod, nm in entries]
        stack += [(num_layers + k, "mtp", mod, nm) for k, mod, nm in mtp_entries]
        for pos, (index, ltype, module, name) in enumerate(stack):
            inner = getattr(module, "transformer_layer", None)
            if ltype == "mtp" and isinstance(inner, nn.Module):
                # An MTP layer's own output has been through its final norm; the residual stream is
                # its transformer layer's output. Its parameters (norms, eh_proj) still count.
                params = [p for p in module.parameters() if p.requires_grad]
                blocks.append(BlockSpec(index=index, layer_type=ltype, module=inner, name=name, params=params))
            else:
                blocks.append(BlockSpec(index=index, layer_type=ltype, module=module, name=name))
            router = find_router(module)
            if router is None:
                continue
            experts = getattr(router, "num_experts", None) or getattr(
                getattr(router, "config", None), "num_moe_experts", None)
            if not isinstance(experts, int):
                raise UnsupportedModelError(f"router of {name}: number of experts unknown")
            routers.append(RouterSpec(layer=pos, module=router, num_experts=experts, extract=output_item(1),
                                      layer_type=ltype, name=f"{name}.mlp.router"))
        params_by_block(model, blocks)
        special: dict[str, list[nn.Parameter]] = {}
        output, embedding, mtp_params = [], [], []
        for chunk in chunks:
            out = getattr(chunk, "output_layer", None)
            if isinstance(out, nn.Module):
                output += [p for p in out.parameters() if _own(p)]
            emb = getattr(chunk, "embedding", None)
            if isinstance(emb, nn.Module):
                embedding += [p for p in emb.parameters() if _own(p)]
            mtp = getattr(chunk, "mtp", None)
            if isinstance(mtp, nn.Module):
                mtp_params += [p for p in mtp.parameters() if _own(p)]
        for group, ps in (("output", output), ("embedding", embedding), ("mtp", mtp_params)):
            if ps:
                special[group] = ps
        all_params = [p for c in chunks for p in c.parameters() if _own(p)]
        spec = ModelSpec(blocks=blocks, routers=routers, special_params=special, all_params=all_params,
                         adapter=self.name, mtp_loss_reader=mtp_losses if mtp_entries else None)
        scales = grad_scales(all_params)
        if scales:
            spec.grad_scale = scales  # type: ignore[attr-defined]  # read by the collector
        ps_ = _parallel_state()
        if ps_ is not None and ps_.get_pipeline_model_parallel_world_size() > 1:
            group = ps_.get_pipeline_model_parallel_group()
            # The same groups, in the same order, on every stage: the all-reduces must pair up.
            spec.all_params.append(PipelinePeers(all_params, scales, group, "total"))  # type: ignore[arg-type]
            spec.special_params["embedding"] = [*embedding, PipelinePeers(embedding, scales, group, "embedding")]  # type: ignore[list-item]
            if ps_.get_pipeline_model_parallel_rank() > 0:
                # Every stage now holds the global values; the first stage writes them (one row per step).
                spec.recorded_elsewhere = frozenset({"total", "embedding"})
        return spec


register_adapter(MegatronAdapter)
