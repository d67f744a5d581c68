"""Hugging Face hybrid MoE models: automatic detection, and every signal checked against an
independent observer while a tiny model of each family trains on CPU."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch
from _deps import require

require("transformers", "Hugging Face hybrid MoE models (in the [dev] extra)")

from hf_models import FAMILIES, VOCAB  # noqa: E402

import healthwatch as hw  # noqa: E402
from healthwatch.hooks.adapters import UnsupportedModelError, auto_adapter  # noqa: E402
from healthwatch.hooks.adapters.huggingface import HuggingFaceAdapter, hf_routing  # noqa: E402

BATCH, SEQ, STEPS, EXPERTS, TOP_K = 2, 16, 3, 8, 2


def _maxvio(c: np.ndarray) -> float:
    mean = c.sum() / c.size
    return float((c.max() - mean) / mean)


class Observer:
    """Records, without healthwatch, what each signal should be: expert counts from the indices
    handed to the experts module, residual RMS from the block outputs, gradient norms per block."""

    def __init__(self, model: torch.nn.Module, experts_path: str) -> None:
        self.layers = model.model.layers
        self.counts: dict[int, np.ndarray] = {}
        self.resid: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._resid(i)))
            try:
                experts = layer.get_submodule(experts_path)
            except AttributeError:
                continue
            self.handles.append(experts.register_forward_pre_hook(self._count(i), with_kwargs=True))

    def _count(self, i: int):
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            assert idx.shape[-1] == TOP_K
            c = np.bincount(idx.reshape(-1).numpy(), minlength=EXPERTS).astype(np.float64)
            self.counts[i] = self.counts.get(i, np.zeros(EXPERTS)) + c

        return hook

    def _resid(self, i: int):
        def hook(_m: Any, _inp: tuple, out: Any) -> None:
            h = out[0] if isinstance(out, tuple) else out
            self.resid[i].append(h.detach().float().pow(2).mean(-1).sqrt())

        return hook

    def reset(self) -> None:
        self.counts, self.resid = {}, defaultdict(list)

    def wgrad(self) -> list[float]:
        out = []
        for layer in self.layers:
            sq = sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters() if p.grad is not None)
            out.append(sq**0.5)
        return out


def _by(df: Any, *keys: str) -> dict:
    return {tuple(r[k] for k in keys): r["value"] for r in df.iter_rows(named=True)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_with_every_signal(family: str, store_dir) -> None:
    build, types, router_path, experts_path = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    model.train()
    run = f"hf-{family.replace('_', '-')}"
    mon = hw.Monitor(store=store_dir, run=run, flush_every_steps=2, flush_every_s=1e9, expert_load_every=1)
    spec = mon.watch(model)  # adapter picked automatically

    assert spec.adapter == f"huggingface:{family}"
    assert [b.layer_type for b in spec.blocks] == types
    moe_layers = [i for i, t in enumerate(types) if t == "moe"]
    assert [r.layer for r in spec.routers] == moe_layers
    assert [r.name for r in spec.routers] == [f"model.layers.{i}.{router_path}" for i in moe_layers]
    assert all(r.num_experts == EXPERTS for r in spec.routers)
    assert set(spec.special_params) == {"output", "embedding"}
    assert spec.special_params["output"][0] is model.lm_head.weight

    obs = Observer(model, experts_path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    expected: dict[str, dict] = defaultdict(dict)
    cumulative = {i: np.zeros(EXPERTS) for i in moe_layers}
    for step in range(STEPS):
        obs.reset()
        ids = torch.randint(3, VOCAB, (BATCH, SEQ))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        mon.after_backward()
        wg = obs.wgrad()
        total = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None) ** 0.5
        expected["grad_norm/output"][(step,)] = float(model.lm_head.weight.grad.double().norm())
        expected["grad_norm/embedding"][(step,)] = float(model.get_input_embeddings().weight.grad.double().norm())
        opt.step()
        opt.zero_grad()
        mon.step(step, tokens=(step + 1) * BATCH * SEQ, loss=out.loss.detach(), lr=1e-3)
        for i in moe_layers:
            c = obs.counts[i]
            assert c.sum() == BATCH * SEQ * TOP_K  # every token routed to top_k experts, counted once
            cumulative[i] += c
            expected["maxvio"][(step, i)] = _maxvio(c)
            expected["dead_experts"][(step, i)] = float((cumulative[i] == 0).sum())
            expected["load"][(step, i)] = c.astype(int).tolist()
        for i in range(len(types)):
            rms = torch.cat([r.reshape(-1) for r in obs.resid[i]])
            expected["resid_rms"][(step, i)] = float(rms.double().mean())
            expected["resid_rms_max"][(step, i)] = float(rms.max())
            expected["wgrad_norm"][(step, i)] = wg[i]
        expected["loss/train"][(step,)] = float(out.loss)
        expected["grad_norm/total"][(step,)] = total
    mon.close()

    store = hw.open_store(store_dir)
    layer_stats = store.sql("SELECT step, layer, layer_type, metric, value FROM layer_stats WHERE run = ?", [run]).pl()
    for metric in ("maxvio", "dead_experts", "resid_rms", "resid_rms_max", "wgrad_norm"):
        got = _by(layer_stats.filter(layer_stats["metric"] == metric), "step", "layer")
        want = expected[metric]
        assert set(got) == set(want), metric
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-9), (metric, key)
    assert set(zip(layer_stats["layer"], layer_stats["layer_type"])) == set(enumerate(types))

    load = store.sql("SELECT step, layer, counts FROM expert_load WHERE run = ?", [run]).pl()
    assert {(r["step"], r["layer"]): list(r["counts"]) for r in load.iter_rows(named=True)} == expected["load"]

    scalars = store.sql("SELECT step, name, value FROM scalars WHERE run = ?", [run]).pl()
    names = set(scalars["name"])
    assert {"loss/train", "lr", "grad_norm/total", "grad_norm/output", "grad_norm/embedding"} <= names
    got = _by(scalars, "step", "name")
    for step in range(STEPS):
        assert got[(step, "loss/train")] == pytest.approx(expected["loss/train"][(step,)], rel=1e-6)
        for name in ("grad_norm/total", "grad_norm/output", "grad_norm/embedding"):
            assert got[(step, name)] == pytest.approx(expected[name][(step,)], rel=1e-4), (step, name)
    store.close()


def test_gradient_checkpointing_counts_each_token_once(store_dir) -> None:
    """Activation recomputation re-runs block forwards inside backward; they must not count again."""
    build, _types, _router, _experts = FAMILIES["nemotron_h"]
    torch.manual_seed(0)
    model = build()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mon = hw.Monitor(store=store_dir, run="hf-ckpt", flush_every_steps=10, flush_every_s=1e9, expert_load_every=1)
    spec = mon.watch(model)
    for step in range(2):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        mon.after_backward()
        model.zero_grad()
        mon.step(step, tokens=(step + 1) * BATCH * SEQ, loss=out.loss.detach())
    mon.close()
    store = hw.open_store(store_dir)
    load = store.sql("SELECT step, layer, counts FROM expert_load").pl()
    assert len(load) == 2 * len(spec.routers)
    assert all(sum(c) == BATCH * SEQ * TOP_K for c in load["counts"])
    store.close()


def test_dense_transformers_model_is_left_to_the_generic_adapter() -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg)
    assert not HuggingFaceAdapter().matches(model)
    assert auto_adapter(model).name == "generic"


def test_other_module_trees_are_not_claimed() -> None:
    assert not HuggingFaceAdapter().matches(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_routing_extractor_handles_every_router_convention() -> None:
    extract = hf_routing(2, 8, "layers.1.router")
    logits = torch.randn(5, 8)
    idx = torch.topk(logits, 2).indices
    # Current routers: (logits, weights, indices) → the indices as given, even if they are not top-k of logits.
    forced = torch.zeros(5, 2, dtype=torch.long)
    assert torch.equal(extract(None, (), (logits, torch.ones(5, 2), forced)), forced)
    # Older Nemotron-H gate: (indices, weights).
    assert torch.equal(extract(None, (), (idx, torch.ones(5, 2))), idx)
    # Older Jamba / Qwen / Mixtral: a bare nn.Linear returning logits [batch, seq, experts].
    got = extract(None, (), logits.reshape(1, 5, 8))
    assert torch.equal(got, idx)
    # Older GraniteMoe TopKGating: (sorted ids, batch index, gates, expert sizes, logits).
    legacy = (torch.arange(10), torch.arange(10) // 2, torch.rand(10), torch.full((8,), 1), logits)
    assert torch.equal(extract(None, (), legacy), idx)
    with pytest.raises(UnsupportedModelError, match="layers.1.router"):
        extract(None, (), (torch.randn(5, 3),))
