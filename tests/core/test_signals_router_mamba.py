"""Router and Mamba health equal hand-computed numbers (docs/signals.md), through a Monitor and the store."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import healthwatch as hw
from healthwatch.hooks.adapters import GenericAdapter
from healthwatch.hooks.signals import decay_terms, decode_bank, dt_terms, router_terms

LN3, LN4, LN6 = math.log(3), math.log(4), math.log(6)


def test_router_terms_by_hand():
    # Token 1: uniform over 4 experts (entropy 1, logsumexp ln 4). Token 2: logits [ln 3, 0, 0, 0]
    # -> p = [1/2, 1/6, 1/6, 1/6], logsumexp = ln 6.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN3, 0.0, 0.0, 0.0]])
    sums, mx = router_terms(logits)
    h2 = -(0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6)) / LN4
    assert sums[0].item() / sums[1].item() == pytest.approx((1.0 + h2) / 2)
    assert sums[2].item() / sums[3].item() == pytest.approx((LN4**2 + LN6**2) / 2)
    assert mx.item() == pytest.approx(LN3)


def test_mamba_terms_by_hand():
    sums, maxes = decay_terms(torch.log(torch.tensor([1.0, 2.0, 4.0])))
    assert sums[0].item() / sums[1].item() == pytest.approx(7 / 3)
    assert (-maxes[0].item(), maxes[1].item()) == pytest.approx((1.0, 4.0))
    # dt = softplus(raw + bias): softplus(0) = ln 2, softplus(ln(e - 1)) = 1.
    sums, maxes = dt_terms(torch.zeros(3, 2), torch.tensor([0.0, math.log(math.e - 1)]))
    assert sums[0].item() / sums[1].item() == pytest.approx((math.log(2) + 1) / 2)
    assert maxes[0].item() == pytest.approx(1.0) and -maxes[1].item() == pytest.approx(math.log(2))


class Router(nn.Module):
    """Returns fixed logits (first output, as HF routers do), plus an aux-loss-free expert bias."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = 4, 1
        self.w = nn.Linear(4, 4, bias=False)
        self.register_buffer("expert_bias", torch.tensor([0.5, -0.25, 0.0, 0.1]))

    def forward(self, x: torch.Tensor):
        logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN3, 0.0, 0.0, 0.0]]) + 0.0 * self.w(x[:2])
        return logits, torch.ones(2, 1), torch.tensor([[0], [1]])


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.router(h.reshape(-1, 4))
        return h


class Mixer(nn.Module):
    """Mamba-2-shaped: ``in_proj`` output ends with the dt columns (one per head)."""

    def __init__(self) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.log(torch.tensor([1.0, 2.0, 4.0])))
        self.dt_bias = nn.Parameter(torch.tensor([0.0, math.log(math.e - 1), 0.0]))
        self.in_proj = nn.Linear(4, 7, bias=False)
        nn.init.zeros_(self.in_proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.0 * self.in_proj(h)[..., :4]


class MambaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = Mixer()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mixer(h)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MambaBlock(), MoE(), nn.Linear(4, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_router_and_mamba_health_end_to_end(store_dir):
    net = Net()
    with hw.Monitor(store=store_dir, run="rm", monitor_config=hw.MonitorConfig(signals_every=1)) as mon:
        spec = mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$", routers=r"\.router$",
                                                      layer_types={r"^layers\.0$": "mamba"}))
        assert [b.layer_type for b in spec.blocks][:2] == ["mamba", "moe"]
        for step in range(2):                    # two microbatches in step 1: averages unchanged
            net(torch.zeros(1, 2, 4))
            if step == 1:
                net(torch.zeros(1, 2, 4))
            mon.step(step, loss=1.0)
    st = hw.open_store(store_dir)
    got = {(s, layer, m): v for s, layer, m, v in st.sql("SELECT step, layer, metric, value FROM layer_stats").fetchall()}
    h2 = -(0.5 * math.log(0.5) + 0.5 * math.log(1 / 6)) / LN4
    for s in (0, 1):
        assert got[(s, 1, "router_entropy")] == pytest.approx((1 + h2) / 2)
        assert got[(s, 1, "router_zloss")] == pytest.approx((LN4**2 + LN6**2) / 2)
        assert got[(s, 1, "router_max_logit")] == pytest.approx(LN3)
        assert got[(s, 1, "expert_bias_range")] == pytest.approx(0.75)
        assert got[(s, 0, "ssm_decay_min")] == pytest.approx(1.0)
        assert got[(s, 0, "ssm_decay_mean")] == pytest.approx(7 / 3)
        assert got[(s, 0, "ssm_decay_max")] == pytest.approx(4.0)
        # dt over heads (bias 0, ln(e-1), 0) on zero input: ln 2, 1, ln 2.
        assert got[(s, 0, "ssm_dt_mean")] == pytest.approx((2 * math.log(2) + 1) / 3)
        assert got[(s, 0, "ssm_dt_max")] == pytest.approx(1.0)
        assert got[(s, 0, "ssm_dt_min")] == pytest.approx(math.log(2))
    # A plain Linear block has neither: no rows, no error.
    assert not [k for k in got if k[1] == 2 and (k[2].startswith("router") or k[2].startswith("ssm"))]


def test_families_can_be_turned_off_and_unknown_ones_are_refused():
    from healthwatch.hooks.collector import StatsCollector

    net = Net()
    spec = GenericAdapter(blocks=r"^layers\.\d+$", routers=r"\.router$").inspect(net)
    with pytest.raises(ValueError, match="unknown signal families"):
        StatsCollector(spec, torch.device("cpu"), families={"quant", "bogus"})
    col = StatsCollector(spec, torch.device("cpu"), families=set())
    # signals_every: activation-side statistics only on every N-th step (the first included).
    sampled = StatsCollector(spec, torch.device("cpu"), signals_every=2)
    sampled.attach()
    taken = []
    base = spec.num_layers + sampled.layout.n_groups + sampled.layout.counts_size()
    for _ in range(3):
        net(torch.zeros(1, 2, 4))
        sums, maxes, *_ = sampled.take_row([])
        got = decode_bank(sums[base:].numpy(), maxes[spec.num_layers:].numpy(),
                          sampled.bank.ratio_slots, sampled.bank.max_slots)
        taken.append("router_entropy" in {m for _p, m, _v in got})
    sampled.detach()
    assert taken == [True, False, True]
    col.attach()
    net(torch.zeros(1, 2, 4))
    col.take_row([])
    assert col.bank.empty
    col.detach()


class FixedRouter(nn.Module):
    """Returns the logits it is handed (first output, as HF routers do) and top-1 choices."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, 1

    def forward(self, logits: torch.Tensor):
        return logits, torch.ones(logits.shape[0], 1), logits.argmax(-1, keepdim=True)


class FixedMoE(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.router = FixedRouter(experts)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.router(logits)[0]


class TwoMoE(nn.Module):
    """Two MoE layers with different expert counts (4 and 6): staged in two width groups."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([FixedMoE(4), FixedMoE(6)])


def test_staged_router_path_equals_router_terms_pooled_and_samples_long_calls():
    """Router health is staged per call and computed for all calls at once in take_row: it must equal
    router_terms (the per-call definition, independent of the staging) pooled over each layer's calls;
    a call longer than ROUTER_SAMPLE_TOKENS is read on every k-th token for entropy and z-loss, while
    the max logit reads every token."""
    from healthwatch.hooks.collector import StatsCollector
    from healthwatch.hooks.signals import ROUTER_SAMPLE_TOKENS

    torch.manual_seed(5)
    net = TwoMoE()
    spec = GenericAdapter(blocks=r"^layers\.\d+$", routers=r"\.router$").inspect(net)
    col = StatsCollector(spec, torch.device("cpu"), families=("router",))
    col.attach()
    first = [torch.randn(7, 4) * 3, torch.randn(5, 4)]            # layer 0: two microbatches
    long = torch.randn(3 * ROUTER_SAMPLE_TOKENS + 1, 6) * 2         # layer 1: one long call
    long[1, 2] = 50.0                                               # in a row the sample skips
    got_steps = []
    for _step in range(2):                                          # the cached layout is reused
        for lg in first:
            net.layers[0].router(lg)
        net.layers[1].router(long)
        sums, maxes, *_ = col.take_row([])
        base = spec.num_layers + col.layout.n_groups + col.layout.counts_size()
        got_steps.append({(p, m): v for p, m, v in decode_bank(sums[base:].numpy(), maxes[spec.num_layers:].numpy(),
                                                               col.bank.ratio_slots, col.bank.max_slots)})
    col.detach()
    s0, m0 = router_terms(torch.cat(first))
    stride = -(-long.shape[0] // ROUTER_SAMPLE_TOKENS)
    assert stride == 4
    s1, _ = router_terms(long[::stride])
    for got in got_steps:
        assert got[(0, "router_entropy")] == pytest.approx(float(s0[0] / s0[1]), rel=1e-5)
        assert got[(0, "router_zloss")] == pytest.approx(float(s0[2] / s0[3]), rel=1e-5)
        assert got[(0, "router_max_logit")] == pytest.approx(float(m0[0]))
        assert got[(1, "router_entropy")] == pytest.approx(float(s1[0] / s1[1]), rel=1e-5)
        assert got[(1, "router_zloss")] == pytest.approx(float(s1[2] / s1[3]), rel=1e-5)
        assert got[(1, "router_max_logit")] == 50.0


def test_staged_dt_equals_dt_terms_pooled_over_calls_and_blocks():
    """dt statistics are staged per in_proj call and added to the bank at take_row: over two Mamba
    blocks and two microbatches of different inputs, each block's mean, max and min equal dt_terms
    (the per-call definition) pooled by hand: sums over calls, extremes over calls."""
    from healthwatch.hooks.collector import StatsCollector

    torch.manual_seed(7)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([MambaBlock(), MambaBlock()])
            for blk in self.layers:
                nn.init.normal_(blk.mixer.in_proj.weight, std=2.0)
                with torch.no_grad():
                    blk.mixer.dt_bias.normal_()

    net = Two()
    spec = GenericAdapter(blocks=r"^layers\.\d+$", layer_types={r"^layers\.\d+$": "mamba"}).inspect(net)
    col = StatsCollector(spec, torch.device("cpu"), families=("mamba",))
    col.attach()
    inputs = [torch.randn(2, 5, 4), torch.randn(1, 3, 4) * 3]
    for x in inputs:
        for blk in net.layers:
            blk(x)
    sums, maxes, *_ = col.take_row([])
    col.detach()
    base = spec.num_layers + col.layout.n_groups + col.layout.counts_size()
    got = {(p, m): v for p, m, v in decode_bank(sums[base:].numpy(), maxes[spec.num_layers:].numpy(),
                                                 col.bank.ratio_slots, col.bank.max_slots)}
    for pos, blk in enumerate(net.layers):
        terms = [dt_terms(blk.mixer.in_proj(x)[..., -3:], blk.mixer.dt_bias) for x in inputs]
        s = sum(t[0] for t in terms)
        assert got[(pos, "ssm_dt_mean")] == pytest.approx(float(s[0] / s[1]), rel=1e-6)
        assert got[(pos, "ssm_dt_max")] == pytest.approx(max(float(t[1][0]) for t in terms))
        assert got[(pos, "ssm_dt_min")] == pytest.approx(min(-float(t[1][1]) for t in terms))
