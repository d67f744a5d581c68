"""Worker for ``test_megatron_parallel.py``: a tiny megatron-core GPTModel (MoE + 2 MTP layers) trained
on CPU with gloo under ``torchrun`` at tensor × pipeline × expert parallel sizes given on the command
line, through megatron's own DDP, schedule and optimizer, watched by a Monitor per pipeline stage.

Usage: ``torchrun --nproc-per-node N megatron_parallel_worker.py STORE OUT RUN TP PP EP SP STEPS``

Besides feeding the Monitor, every rank observes, independently of healthwatch, and rank 0 gathers
and writes ``OUT/expected.json``:

* the routing maps each ``TopKRouter`` returned (every microbatch), gathered to rank 0, whose
  column sums over all ranks are the global expert counts of the layer;
* every parameter's ``main_grad`` with its sharding attributes, gathered to rank 0, which rebuilds
  the full parameters (tensor-parallel shards concatenated along their partition dimension,
  expert shards of different expert-parallel ranks side by side) and takes norms of those;
* the logits of every ``output_layer`` call (MTP heads first, then the main head, per microbatch),
  gathered over the tensor-parallel group to the full vocabulary, from which the main and each MTP
  head's cross-entropy are computed with the labels rolled as MTP defines them;
* megatron's own global grad norm.
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
from megatron_setup import MBS, MICRO, MTP, NUM_LAYERS, SEQ, batches, build, forward_step  # noqa: E402

import healthwatch as hw  # noqa: E402
from healthwatch.hooks.adapters.megatron import mtp_losses, stage_process_group  # noqa: E402


def main() -> None:
    store, out, run = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    tp, pp, ep, sp, steps = (int(x) for x in sys.argv[4:9])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    trained = build(tp=tp, pp=pp, ep=ep, sp=bool(sp))
    gpt, model, opt, last = trained.gpt, trained.model, trained.opt, trained.last

    mon = hw.Monitor(store=store, run=run, flush_every_steps=2, flush_every_s=1e9, expert_load_every=1,
                     process_group=stage_process_group())
    spec = mon.watch(model)

    # -- independent observers ---------------------------------------------------------------
    # Global layer index of each module name, from megatron's own numbering (layer_number, 1-based).
    layer_of: dict[str, int] = {}
    for i, layer in enumerate(gpt.decoder.layers):
        layer_of[f"decoder.layers.{i}."] = layer.layer_number - 1
    if getattr(gpt, "mtp", None) is not None:
        for j, _layer in enumerate(gpt.mtp.layers):
            layer_of[f"mtp.layers.{j}."] = NUM_LAYERS + j

    maps: dict[int, list[torch.Tensor]] = {}

    def keep_map(layer: int):
        def hook(module: torch.nn.Module, _i: tuple, output: tuple) -> None:
            if torch.is_grad_enabled() and module.training:
                maps.setdefault(layer, []).append(output[1].detach().clone())

        return hook

    for prefix, layer in layer_of.items():
        router = gpt.get_submodule(prefix.rstrip(".")).mlp if prefix.startswith("decoder") else \
            gpt.get_submodule(prefix.rstrip(".")).transformer_layer.mlp
        if hasattr(router, "router"):
            router.router.register_forward_hook(keep_map(layer))

    logits_seen: list[torch.Tensor] = []
    labels_seen: list[torch.Tensor] = []
    if last:
        gpt.output_layer.register_forward_hook(
            lambda _m, _i, o: logits_seen.append(o[0].detach().clone()) if torch.is_grad_enabled() else None)

    coords = {"rank": rank, "stage": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank(),
              "dp": ps.get_data_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
              "etp": ps.get_expert_tensor_parallel_rank(), "edp": ps.get_expert_data_parallel_rank()}
    data = batches(100 + ps.get_data_parallel_rank())  # data differs per DP rank only
    fb = get_forward_backward_func()
    expected: dict = {"steps": {}, "layers": None}
    for step in range(steps):
        maps.clear()
        logits_seen.clear()
        labels_seen.clear()
        model.zero_grad_buffer()
        opt.zero_grad()
        reduced = fb(forward_step_func=forward_step(labels_seen.append), data_iterator=data, model=[model], num_microbatches=MICRO,
                     seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        mon.after_backward()
        grads = [{"name": n, "grad": p.main_grad.detach().double().clone(),
                  "tp_split": bool(getattr(p, "tensor_model_parallel", False)),
                  "dim": int(getattr(p, "partition_dim", -1)), "expert": not getattr(p, "allreduce", True),
                  "shared": bool(getattr(p, "shared", False))}
                 for n, p in gpt.named_parameters() if p.requires_grad]
        ok, grad_norm, _zeros = opt.step()
        assert ok
        loss = torch.stack([r["lm loss"] for r in reduced]).mean() if reduced else None
        heads = mtp_losses(num_microbatches=MICRO, reset=True) if last else []
        dp = world // (pp * tp)
        # lr and losses from the last stage only: each stage's Monitor writes what it is given.
        mon.step(step, tokens=(step + 1) * dp * MICRO * MBS * SEQ, loss=loss, mtp_losses=heads,
                 lr=1e-3 if last else None)

        # Full-vocabulary logits: gather the vocab-parallel shards over the TP group (last stage).
        full_logits = []
        for lg in logits_seen:
            if tp > 1:
                parts = [torch.empty_like(lg) for _ in range(tp)]
                dist.all_gather(parts, lg.contiguous(), group=ps.get_tensor_model_parallel_group())
                lg = torch.cat(parts, dim=-1)
            full_logits.append(lg)
        mine = {"coords": coords, "grads": grads, "maps": {k: [m.to(torch.int8) for m in v] for k, v in maps.items()},
                "logits": full_logits, "labels": labels_seen[:], "grad_norm": float(grad_norm), "last": last,
                "layer_of": layer_of}
        box = [None] * world if rank == 0 else None
        dist.gather_object(mine, box, dst=0)
        if rank == 0:
            expected["steps"][step] = reconstruct(box)
    if rank == 0:
        expected["monitor_layers"] = [(b.index, b.layer_type, b.name) for b in spec.blocks]
    mon.close()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "expected.json").write_text(json.dumps(expected))
    dist.barrier()
    dist.destroy_process_group()


def _ce(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> float:
    """Mean cross-entropy of ``logits [s, b, V]`` against ``labels [b, s]`` shifted left by ``shift``
    (MTP depth), over the positions whose shifted label exists (megatron's rolled loss mask)."""
    s = labels.shape[1]
    lg = logits.double().transpose(0, 1)[:, : s - shift]  # [b, s - shift, V]
    tgt = labels[:, shift:]
    return float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1)))


def reconstruct(ranks: list[dict]) -> dict:
    """Expected values of one step from what every rank saw (runs on rank 0)."""
    # -- expert counts: column sums of every routing map of every rank, per global layer
    counts: dict[int, torch.Tensor] = {}
    for r in ranks:
        for layer, ms in r["maps"].items():
            for m in ms:
                counts[layer] = counts.get(layer, torch.zeros(m.shape[1], dtype=torch.long)) + m.long().sum(0)
    # -- full parameters: dense from DP rank 0 (TP shards concatenated), experts from expert-DP rank 0
    shards: dict[tuple, list[tuple[int, dict]]] = {}
    for r in ranks:
        c = r["coords"]
        for g in r["grads"]:
            if g["shared"]:
                continue  # a later stage's copy of the word embeddings (megatron counts it once)
            if g["expert"]:
                if c["edp"] != 0:
                    continue
                key = (c["stage"], g["name"], c["ep"])
                shards.setdefault(key, []).append((c["etp"], g))
            else:
                if c["dp"] != 0:
                    continue
                key = (c["stage"], g["name"], -1)
                shards.setdefault(key, []).append((c["tp"], g))
    full: dict[tuple, torch.Tensor] = {}
    for key, parts in shards.items():
        parts.sort(key=lambda x: x[0])
        g0 = parts[0][1]
        if g0["tp_split"] and len(parts) > 1:
            full[key] = torch.cat([g["grad"] for _, g in parts], dim=g0["dim"])
        else:
            for _, g in parts[1:]:  # replicated: identical on every TP rank after megatron's reductions
                assert torch.allclose(g["grad"], g0["grad"], rtol=1e-5, atol=1e-12), key
            full[key] = g0["grad"]
    sq = {key: float(t.pow(2).sum()) for key, t in full.items()}
    layer_of = {r["coords"]["stage"]: r["layer_of"] for r in ranks}  # module prefix -> global layer, per stage
    layer_sq: dict[int, float] = {}
    for (stage, name, _ep), v in sq.items():
        for prefix, idx in layer_of[stage].items():
            if name.startswith(prefix):
                layer_sq[idx] = layer_sq.get(idx, 0.0) + v
    group_sq = {"total": sum(sq.values()),
                "output": sum(v for (_s, n, _e), v in sq.items() if n.startswith("output_layer.")),
                "embedding": sum(v for (_s, n, _e), v in sq.items() if n.startswith("embedding.")),
                "mtp": sum(v for (_s, n, _e), v in sq.items() if n.startswith("mtp."))}
    shapes = {f"{k[0]}:{k[1]}:{k[2]}": list(t.shape) for k, t in full.items()}
    # -- losses from the logits: per last-stage DP replica (TP rank 0), mean over microbatches
    main, heads = [], [[] for _ in range(MTP)]
    for r in ranks:
        if not r["last"] or r["coords"]["tp"] != 0:
            continue
        lgs, lbs = r["logits"], r["labels"]
        assert len(lgs) == (1 + MTP) * len(lbs), (len(lgs), len(lbs))
        for mb, labels in enumerate(lbs):
            calls = lgs[mb * (1 + MTP):(mb + 1) * (1 + MTP)]  # MTP heads first, then the main head
            for d in range(MTP):
                heads[d].append(_ce(calls[d], labels, d + 1))
            main.append(_ce(calls[MTP], labels, 0))
    return {"counts": {int(k): v.tolist() for k, v in counts.items()},
            "wgrad": {int(k): v ** 0.5 for k, v in layer_sq.items()},
            "grad_norm": {k: v ** 0.5 for k, v in group_sq.items()},
            "megatron_grad_norm": ranks[0]["grad_norm"],
            "loss": sum(main) / len(main), "mtp": [sum(h) / len(h) for h in heads],
            "full_shapes": shapes}


if __name__ == "__main__":
    main()
