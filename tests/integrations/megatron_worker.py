"""Worker for ``test_megatron.py``: a tiny megatron-core GPTModel (MoE + 2 MTP layers) trained on
CPU with gloo under ``torchrun``, through megatron's own DDP, schedule and optimizer.

Usage: ``torchrun --nproc-per-node N megatron_worker.py STORE OUT EP [STEPS [PP]]``

With ``PP=2`` the first stage holds layer 0 and the embedding, the second layers 1-2, the MTP
layers and the output layer; each stage's first rank writes its own layers.

Each rank feeds the Monitor and writes ``OUT/rank<k>.json`` with what it saw independently of
healthwatch: megatron's own per-expert token counter (``TopKRouter.local_tokens_per_expert``,
enabled by the expert bias), per-layer squared gradient norms split into replicated and
expert-parallel parameters, megatron's global grad norm, the losses and the layer numbering.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import megatron_shims  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

megatron_shims.install()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron_setup import MBS, MICRO, SEQ, batches, build, forward_step  # noqa: E402

import healthwatch as hw  # noqa: E402
from healthwatch.hooks.adapters.megatron import mtp_losses, stage_process_group  # noqa: E402


def main() -> None:
    store, out, ep = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    pp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    trained = build(pp=pp, ep=ep)
    gpt, model, opt, last = trained.gpt, trained.model, trained.opt, trained.last

    mon = hw.Monitor(store=store, run=f"megatron-ep{ep}", flush_every_steps=2, flush_every_s=1e9,
                     expert_load_every=1, process_group=stage_process_group())
    spec = mon.watch(model)  # adapter picked automatically through the DDP wrapper

    # Independent observers: megatron's own token counter, read when the router returns (it is
    # reset by finalize_model_grads at the end of forward_backward_func).
    routers = {r.layer: r.module for r in spec.routers}
    counter: dict[int, list[int]] = {}

    def keep(pos: int):
        def hook(module: torch.nn.Module, _i: tuple, _o: object) -> None:
            if torch.is_grad_enabled():
                counter[pos] = module.local_tokens_per_expert.tolist()

        return hook

    for pos, router in routers.items():
        router.register_forward_hook(keep(pos))

    seen: dict = {"layers": [(b.index, b.layer_type, b.name) for b in spec.blocks],
                  "routers": [(r.layer, r.name) for r in spec.routers],
                  "special": sorted(spec.special_params), "counts": {}, "wgrad": {}, "grad_norm": {},
                  "loss": {}, "mtp": {}, "mtp_tracker": {}}
    data = batches(100 + rank)  # each data-parallel rank reads different data
    fb = get_forward_backward_func()
    for step in range(steps):
        counter.clear()
        model.zero_grad_buffer()
        opt.zero_grad()
        reduced = fb(forward_step_func=forward_step(), data_iterator=data, model=[model], num_microbatches=MICRO,
                     seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        mon.after_backward()
        wg = []
        for block in spec.blocks:
            rep = exp = 0.0
            for p in gpt.get_submodule(block.name).parameters():  # the whole layer, by its name
                sq = float(p.main_grad.double().pow(2).sum())
                if getattr(p, "allreduce", True):
                    rep += sq
                else:
                    exp += sq
            wg.append((rep, exp))
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        tracker = MTPLossLoggingHelper.tracker["values"].tolist() if last else []
        ok, grad_norm, _zeros = opt.step()
        assert ok
        # Only the last stage has losses (megatron returns no reduced losses elsewhere).
        loss = torch.stack([r["lm loss"] for r in reduced]).mean() if reduced else None
        heads = mtp_losses(num_microbatches=MICRO, reset=True) if last else []
        dp = world // pp
        mon.step(step, tokens=(step + 1) * dp * MICRO * MBS * SEQ, loss=loss, mtp_losses=heads, lr=1e-3)
        seen["counts"][step] = {pos: c for pos, c in counter.items()}
        seen["wgrad"][step] = wg
        seen["grad_norm"][step] = float(grad_norm)
        seen["loss"][step] = float(loss) if loss is not None else None
        seen["mtp"][step] = [float(h) for h in heads]
        seen["mtp_tracker"][step] = tracker
    mon.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "stage": ps.get_pipeline_model_parallel_rank(),
                                                      **seen}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
