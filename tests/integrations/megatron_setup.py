"""The tiny megatron-core GPTModel both megatron workers train (MoE + 2 MTP layers, CPU, gloo).

One definition of the model, its DDP wrapper and optimizer, the random token batches and the
forward step, so that ``megatron_worker.py`` (expert and pipeline parallel, megatron's own
counters) and ``megatron_parallel_worker.py`` (tensor x pipeline x expert parallel, full
reconstruction on rank 0) test the same training. Import it after ``megatron_shims.install()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ, MBS, MICRO, EXPERTS, TOP_K, HIDDEN, MTP = 64, 16, 2, 2, 8, 2, 32, 2
NUM_LAYERS = 3


@dataclass
class Trained:
    """What a worker trains: the bare model, its DDP wrapper, the optimizer and this rank's stages."""

    gpt: GPTModel
    model: DistributedDataParallel
    opt: Any
    first: bool
    last: bool


def build(tp: int = 1, pp: int = 1, ep: int = 1, sp: bool = False) -> Trained:
    """Initialise megatron's parallel state and build the model, DDP and Adam for these sizes.

    With ``pp == 2`` the first stage holds layer 0 and the embedding, the second layers 1-2, the
    MTP layers and the output layer.
    """
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    mrandom.model_parallel_cuda_manual_seed(1234)
    cfg = TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64, add_bias_linear=False,
        num_moe_experts=EXPERTS, moe_router_topk=TOP_K, moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1],
        moe_token_dispatcher_type="alltoall", moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_aux_loss_coeff=0.0, expert_model_parallel_size=ep,
        tensor_model_parallel_size=tp, sequence_parallel=bool(sp),
        mtp_num_layers=MTP, mtp_loss_scaling_factor=0.1, use_cpu_initialization=True,
        params_dtype=torch.float32, bf16=False, hidden_dropout=0.0, attention_dropout=0.0,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        num_layers_in_first_pipeline_stage=1 if pp == 2 else None,
    )
    block_spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    mtp_spec = get_gpt_mtp_block_spec(cfg, get_gpt_layer_local_spec(num_experts=EXPERTS), use_transformer_engine=False)
    gpt = GPTModel(config=cfg, transformer_layer_spec=block_spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                   mtp_block_spec=mtp_spec if last else None, share_embeddings_and_output_weights=False,
                   pre_process=first, post_process=last)
    model = DistributedDataParallel(
        config=cfg, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=gpt)
    cfg.finalize_model_grads_func = finalize_model_grads
    # clip_grad=0: megatron still computes the global grad norm, but skips clipping, whose
    # clip_grad_by_total_norm_fp32 asserts CUDA tensors.
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=False, fp16=False, clip_grad=0.0,
                                                 use_distributed_optimizer=False), [model])
    return Trained(gpt, model, opt, first, last)


def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random (tokens, labels) microbatches; ``seed`` decides which ranks read the same data."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        yield ids[:, :-1], ids[:, 1:]


def _loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = output.float().mean()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place


def forward_step(on_labels: Callable[[torch.Tensor], None] | None = None) -> Callable[..., Any]:
    """Megatron's ``forward_step_func`` over :func:`batches`; ``on_labels`` sees each microbatch's labels."""

    def step(data: Iterator[tuple[torch.Tensor, torch.Tensor]], mdl: Any) -> tuple[Any, Any]:
        tokens, labels = next(data)
        if on_labels is not None:
            on_labels(labels.clone())
        pos_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
        output = mdl(input_ids=tokens, position_ids=pos_ids, attention_mask=None, labels=labels)
        return output, partial(_loss_func)

    return step
