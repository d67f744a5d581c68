"""HybridLM: shapes, MTP weight sharing, NVFP4 layer selection, fault knobs, and real learning."""

import math

import pytest
import torch

from healthwatch.demo.data import SyntheticTokens
from healthwatch.demo.model import (
    Block,
    GroupedExperts,
    HybridConfig,
    HybridLM,
    Router,
    _apply_rope,
    _causal_depthwise_conv,
    _relu2,
    _rope_table,
)
from healthwatch.demo.nvfp4 import QuantLinear


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return SyntheticTokens(256, 32, 2, seed=0).batch_at(0)


def _model(**kw) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(HybridConfig(**kw))


def test_config_parses_pattern() -> None:
    cfg = HybridConfig()
    assert cfg.layer_types == ["mamba", "moe", "attention", "moe", "mamba", "moe", "mamba", "moe"]
    assert cfg.n_layers == 8 and cfg.n_quant_layers == 7
    assert HybridConfig(pattern="M-" * 10).n_quant_layers == 17  # 0.85 * 20, not 18
    with pytest.raises(ValueError, match="unknown letters"):
        HybridConfig(pattern="MX")
    with pytest.raises(ValueError, match="precision"):
        HybridConfig(precision="fp8")


def test_forward_backward_shapes(batch: torch.Tensor) -> None:
    model = _model()
    out = model(batch)
    b, seq = batch.shape[0], batch.shape[1] - 3
    assert out.logits.shape == (b, seq, 256)
    assert out.loss.shape == () and len(out.mtp_losses) == 2
    # At initialisation every head is close to uniform.
    for loss in [out.loss, *out.mtp_losses]:
        assert abs(loss.item() - math.log(256)) < 0.5
    want = out.loss + 0.05 * sum(out.mtp_losses) + out.aux_loss
    torch.testing.assert_close(out.total_loss, want)
    # 6 router calls (4 main MoE blocks + the MTP MoE block twice), each ~1.0 * 1e-2 balanced.
    assert 0.05 < out.aux_loss.item() < 0.1
    out.total_loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.output.weight.grad.abs().sum() > 0 and model.embedding.weight.grad.abs().sum() > 0


def test_forward_without_mtp(batch: torch.Tensor) -> None:
    model = _model()
    out = model(batch[:, :20], mtp=False)
    assert out.logits.shape == (2, 19, 256) and out.mtp_losses == []
    with pytest.raises(ValueError, match="need at least"):
        model(batch[:, :3])


def test_block_structure_for_adapters() -> None:
    model = _model()
    assert [b.layer_type for b in model.blocks] == model.config.layer_types
    assert [b.index for b in model.blocks] == list(range(8))
    routers = [b.router for b in model.blocks if b.layer_type == "moe"]
    assert len(routers) == 4 and all(isinstance(r, Router) for r in routers)
    assert all(b.router is None for b in model.blocks if b.layer_type != "moe")
    assert routers[0].num_experts == 32 and routers[0].top_k == 2
    assert len(list(model.routers())) == 5  # + the MTP MoE block


def test_router_hook_reads_topk_indices(batch: torch.Tensor) -> None:
    model = _model()
    seen = []
    router = model.blocks[1].router
    router.register_forward_hook(lambda mod, inp, output: seen.append(output))
    model(batch)
    probs, weights, idx = seen[0]
    tokens = batch.shape[0] * (batch.shape[1] - 3)
    experts, k = router.num_experts, router.top_k
    assert probs.shape == (tokens, experts) and weights.shape == (tokens, k) and idx.shape == (tokens, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
    assert idx.dtype == torch.long and int(idx.max()) < experts


def test_experts_match_a_naive_loop() -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(8, 16, 32)
    torch.nn.init.normal_(experts.w1)
    torch.nn.init.normal_(experts.w2)
    x = torch.randn(40, 16)
    idx = torch.randn(40, 8).topk(3, -1).indices
    w = torch.rand(40, 3)
    want = torch.zeros(40, 16)
    for t in range(40):
        for j in range(3):
            e = idx[t, j]
            want[t] += w[t, j] * (torch.relu(x[t] @ experts.w1[e].t()) ** 2) @ experts.w2[e].t()
    torch.testing.assert_close(experts(x, w, idx), want, rtol=1e-4, atol=1e-3)


def test_causal_conv_matches_conv1d() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(12, 12, 4, groups=12, padding=3)
    x = torch.randn(2, 9, 12)
    want = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    torch.testing.assert_close(_causal_depthwise_conv(x, conv.weight, conv.bias), want)


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    rot = _rope_table(40, 16, 10000.0, torch.device("cpu"), False)

    def at(v: torch.Tensor, pos: int) -> torch.Tensor:
        return _apply_rope(v.expand(1, 40, 1, 16).contiguous(), rot)[0, pos, 0]

    torch.testing.assert_close(at(q, 5) @ at(k, 3), at(q, 25) @ at(k, 23))
    torch.testing.assert_close(at(q, 7).norm(), q.norm())
    torch.testing.assert_close(at(q, 0), q)


def test_relu2_gradient() -> None:
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_relu2, (x,))
    torch.testing.assert_close(_relu2(x), torch.relu(x) ** 2)


def test_mtp_heads_share_one_set_of_weights(batch: torch.Tensor) -> None:
    model = _model()
    mtp = model.mtp
    assert [b.layer_type for b in mtp.blocks] == ["attention", "moe"]
    calls = {id(p): 0 for b in mtp.blocks for p in b.parameters()}

    def count(mod: torch.nn.Module, args: tuple) -> None:
        for p in mod.parameters():
            calls[id(p)] += 1

    hooks = [b.register_forward_pre_hook(count) for b in mtp.blocks]
    model(batch)
    for h in hooks:
        h.remove()
    # Every shared parameter object was used by both depths, and there is one copy of each.
    assert set(calls.values()) == {2}
    main_ids = {id(p) for b in model.blocks for p in b.parameters()}
    assert main_ids.isdisjoint(calls)
    # Per-depth input projections are separate; the output layer is shared with the main head.
    assert len(mtp.projs) == 2 and mtp.projs[0].weight is not mtp.projs[1].weight
    assert model.output.weight is not model.embedding.weight


def _quant_flags(model: HybridLM) -> dict[str, bool]:
    return {name: m.quantize for name, m in model.quantizable_modules()}


def test_quantize_flags_on_first_85_percent_of_layers() -> None:
    model = _model()
    n_quant = math.ceil(0.85 * 8)
    flags = _quant_flags(model)
    assert any(flags.values())
    for name, m in model.quantizable_modules():
        if isinstance(m, Router):
            assert not m.quantize, name  # routers stay high precision
        elif name.startswith("blocks."):
            assert m.quantize == (int(name.split(".")[1]) < n_quant), name
        else:
            assert not m.quantize, name  # MTP, output
    kinds = {type(m) for _, m in model.quantizable_modules() if m.quantize}
    assert kinds == {QuantLinear, GroupedExperts}
    model.set_precision("bf16")
    assert not any(_quant_flags(model).values()) and model.config.precision == "bf16"
    model.set_precision("nvfp4")
    assert _quant_flags(model) == flags
    assert not any(_quant_flags(_model(precision="bf16")).values())
    with pytest.raises(ValueError):
        model.set_precision("fp8")


def test_fused_weight_quantisation_matches_per_layer(
    batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    with torch.no_grad():
        fused = model(batch)
        monkeypatch.setattr(HybridLM, "_prequantize_weights", lambda self: [])
        per_layer = model(batch)
    assert torch.equal(fused.logits, per_layer.logits)
    assert all(not m.prequantized for _, m in model.quantizable_modules())


def test_nvfp4_and_bf16_differ_slightly(batch: torch.Tensor) -> None:
    model = _model()
    model.eval()
    with torch.no_grad():
        low = model(batch)
        model.set_precision("bf16")
        ref = model(batch)
    assert low.loss.item() != ref.loss.item()
    assert abs(low.loss.item() - ref.loss.item()) / ref.loss.item() < 0.02
    rel = (low.logits - ref.logits).norm() / ref.logits.norm()
    assert 1e-4 < rel < 0.3


def test_fault_knobs(batch: torch.Tensor) -> None:
    model = _model()
    block = model.blocks[1]
    router = block.router
    assert torch.equal(router.logit_bias, torch.zeros(router.num_experts)) and float(block.residual_scale) == 1.0
    seen = []
    router.register_forward_hook(lambda mod, inp, output: seen.append(output[2]))
    with torch.no_grad():
        router.logit_bias[3] = 50.0
        model(batch)
    assert (seen[-1] == 3).any(-1).all()  # every token now routes to expert 3
    # A zero residual scale turns the block into the identity.
    h = torch.randn(2, 8, 64)
    block.residual_scale.fill_(0.0)
    assert torch.equal(block(h), h)
    # Knobs are not checkpoint state, and reset_faults clears them.
    keys = model.state_dict().keys()
    assert not any(k.endswith("logit_bias") or k.endswith("residual_scale") for k in keys)
    assert any(k.endswith("expert_bias") for k in keys)
    model.reset_faults()
    assert float(router.logit_bias.abs().sum()) == 0.0 and float(block.residual_scale) == 1.0


def test_inference_mode_then_training(batch: torch.Tensor) -> None:
    model = _model()
    with torch.inference_mode():
        model(batch)
    model(batch).total_loss.backward()  # the RoPE table cached under inference mode is not reused


def test_checkpoint_round_trip(batch: torch.Tensor) -> None:
    model = _model()
    other = HybridLM(HybridConfig())
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(batch).total_loss, other(batch).total_loss, rtol=0, atol=0)
    assert all(isinstance(b, Block) for b in other.blocks)


def test_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = HybridLM(HybridConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = SyntheticTokens(256, 64, 8, seed=0)
    losses, mtp2 = [], []
    for _ in range(30):
        out = model(next(data))
        out.total_loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        mtp2.append(out.mtp_losses[1].item())
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > math.log(256) - 0.2
    assert last < first - 0.5, losses
    assert sum(mtp2[-5:]) / 5 < mtp2[0] - 0.4, mtp2
