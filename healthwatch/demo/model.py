"""The demo trainer's reference model: a small hybrid Mamba-2 / attention / LatentMoE LM with MTP.

It is tiny, but every part that a training-health monitor watches on a real hybrid MoE run is
real here: Mamba-2 SSD mixers, GQA attention with RoPE, top-k routed latent-space experts with a
shared expert and a load-balancing loss, two multi-token-prediction (MTP) heads sharing one
attention + MoE block, and NVFP4 fake quantisation of all GEMMs except the last 15 % of layers,
the MTP block, the embedding and the output layer.

Structure the monitoring adapters rely on:

* ``model.blocks``: ``nn.ModuleList`` of :class:`Block`, each with ``layer_type`` in
  ``{"mamba", "attention", "moe", "mlp"}`` and ``index``; a block returns the residual stream.
* MoE blocks: ``block.mixer.router`` (also ``block.router``) is a :class:`Router`; its forward
  returns ``(probs [T, E], topk_weights [T, k], topk_indices [T, k])``.
* ``model.mtp.blocks``: the shared MTP attention and MoE blocks (run once per MTP depth).
* ``model.embedding``, ``model.output``.

Fault-injection knobs (non-persistent buffers, so checkpoints never carry a fault and a
rollback does not silently restore one): ``router.logit_bias`` (added to router logits) and
``block.residual_scale`` (multiplies a block's residual branch). ``HybridLM.reset_faults()``
clears them all.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from healthwatch.demo.nvfp4 import (
    QuantLinear,
    fake_quant_nvfp4_amax,
    fake_quant_nvfp4_many_amax,
    observe_quant,
)
from healthwatch.demo.ssd import ssd

__all__ = [
    "LAYER_TYPES",
    "Attention",
    "Block",
    "GroupedExperts",
    "HybridConfig",
    "HybridLM",
    "LatentMoE",
    "MLP",
    "MTPBlock",
    "Mamba2Mixer",
    "ModelOutput",
    "Router",
]

#: Pattern letter -> block ``layer_type``.
LAYER_TYPES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
PRECISIONS = ("nvfp4", "bf16")


@dataclass
class HybridConfig:
    """Hyper-parameters of :class:`HybridLM`; the defaults are the demo model (~0.9M parameters)."""

    vocab_size: int = 256
    d_model: int = 64
    #: One letter per block: M = Mamba-2, E = MoE, * = attention (GQA), - = dense MLP; spaces ignored.
    pattern: str = "M E * E M E M E"
    # attention
    n_heads: int = 4
    n_kv_heads: int = 2
    rope_theta: float = 10000.0
    # Mamba-2
    d_state: int = 16
    headdim: int = 16
    expand: int = 2
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 16
    # LatentMoE. 32 experts, top-2: MaxVio is bounded by num_experts/top_k - 1 = 15, so the demo can
    # show the report's values (healthy median ~1.2, first MoE layer 4.8 -> ~12) and the default
    # alert pack's MaxVio thresholds (8, 12) are reachable; 16 experts top-4 capped MaxVio at 3.
    num_experts: int = 32
    top_k: int = 2
    moe_latent_dim: int = 32
    moe_ffn: int = 64
    shared_expert_ffn: int = 128
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 1e-2
    router_z_loss_coef: float = 0.0
    #: Step size of aux-loss-free balancing (DeepSeek-V3 expert bias); 0 disables it.
    router_bias_update_rate: float = 0.0
    # dense MLP blocks ("-")
    mlp_ffn: int = 128
    # multi-token prediction
    mtp_heads: int = 2
    mtp_loss_scale: float = 0.05
    # precision
    precision: str = "nvfp4"
    #: Leading fraction of blocks whose GEMMs run in NVFP4; the rest stay high precision.
    quant_fraction: float = 0.85
    #: Routers are kept high precision by default: their logits decide discrete assignments.
    quantize_router: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    layer_types: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        letters = [c for c in self.pattern if not c.isspace()]
        bad = sorted({c for c in letters if c not in LAYER_TYPES})
        if bad or not letters:
            raise ValueError(f"pattern {self.pattern!r}: unknown letters {bad} (use M, E, *, -)")
        self.layer_types = [LAYER_TYPES[c] for c in letters]
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("attention head dim must be even for RoPE")
        if (self.expand * self.d_model) % self.headdim or (
            (self.expand * self.d_model) // self.headdim
        ) % self.n_groups:
            raise ValueError("expand*d_model must divide into headdim-sized heads, evenly over n_groups")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts], got {self.top_k}")
        if not 0.0 <= self.quant_fraction <= 1.0:
            raise ValueError(f"quant_fraction must be in [0, 1], got {self.quant_fraction}")
        if self.mtp_heads < 0:
            raise ValueError("mtp_heads must be non-negative")

    @property
    def n_layers(self) -> int:
        """Number of main blocks (MTP not counted)."""
        return len(self.layer_types)

    @property
    def n_quant_layers(self) -> int:
        """Blocks ``0 .. n_quant_layers-1`` run NVFP4 when ``precision == "nvfp4"``."""
        # Round first: 0.85 * 20 is 17.000000000000004 in floating point, and must give 17.
        return math.ceil(round(self.quant_fraction * self.n_layers, 9))


@dataclass
class ModelOutput:
    """What :meth:`HybridLM.forward` returns."""

    #: Main next-token cross-entropy (predicting t+1).
    loss: Tensor
    #: Unscaled cross-entropy of each MTP depth d (predicting t+1+d).
    mtp_losses: list[Tensor]
    #: Router load-balancing (+ z) losses of all MoE layers, already multiplied by their coefficients.
    aux_loss: Tensor
    #: ``loss + mtp_loss_scale * sum(mtp_losses) + aux_loss``: what to backpropagate.
    total_loss: Tensor
    #: Main-head logits ``[batch, seq, vocab]``.
    logits: Tensor


class _ReLU2(torch.autograd.Function):
    """Squared ReLU with a hand-written backward (``2 * relu(x) * grad``).

    Autograd's own graph for ``relu(x) ** 2`` runs a pow backward plus a threshold backward over
    the expert hidden activations, the largest tensors of a step; this is half the passes.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (r,) = ctx.saved_tensors
        return grad * r * 2.0


def _relu2(x: Tensor) -> Tensor:
    """Squared ReLU, the MLP/expert activation of Nemotron-H style models."""
    return _ReLU2.apply(x)


class MLP(nn.Module):
    """Dense squared-ReLU MLP (also the MoE's always-on shared expert)."""

    def __init__(self, d_model: int, ffn: int) -> None:
        super().__init__()
        self.up = QuantLinear(d_model, ffn, bias=False)
        self.down = QuantLinear(ffn, d_model, bias=False)
        self.down.is_residual_out = True  # type: ignore[assignment]

    def forward(self, x: Tensor, input_quantized: bool = False) -> Tensor:
        """``down(relu(up(x))**2)``; ``input_quantized`` as in :meth:`QuantLinear.forward`."""
        return self.down(_relu2(self.up(x, input_quantized)))


@functools.cache
def _rope_table(length: int, dim: int, theta: float, device: torch.device, inference: bool) -> Tensor:
    """Unit complex rotations ``[length, 1, dim/2]``; cached because every step uses the same length.

    ``inference`` is part of the key because a table built under ``torch.inference_mode`` must
    never be reused by a training forward (autograd refuses to save inference tensors).
    """
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    ang = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(ang), ang).unsqueeze(1)


def _apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate ``x [b, t, heads, d]`` by position: adjacent pairs of features as complex numbers.

    One complex multiply instead of the half-split form's eight real ops (and their backward).
    """
    b, t, h, d = x.shape
    pairs = torch.view_as_complex(x.float().reshape(b, t, h, d // 2, 2))
    return torch.view_as_real(pairs * rot).reshape(b, t, h, d).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and a fused QKV projection."""

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.qkv = QuantLinear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=False)
        self.out_proj = QuantLinear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.out_proj.is_residual_out = True  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        """``x [b, t, d] -> [b, t, d]``."""
        b, t, _ = x.shape
        nq, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(b, t, nq + 2 * nkv, self.head_dim)
        rot = _rope_table(t, self.head_dim, self.rope_theta, x.device, torch.is_inference_mode_enabled())
        # Queries and keys sit next to each other in the fused projection: rotate them together.
        q, k = _apply_rope(qkv[:, :, : nq + nkv], rot).transpose(1, 2).split([nq, nkv], dim=1)
        v = qkv[:, :, nq + nkv :].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, nq * self.head_dim))


def _causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise conv over time of ``x [b, t, c]`` with ``nn.Conv1d`` weights ``[c, 1, k]``.

    Equal to ``conv1d(x.transpose(1, 2), padding=k-1)[..., :t]`` but computed as k shifted
    multiply-adds in the ``[b, t, c]`` layout: for a kernel of 4 this is about half the CPU time
    of the conv kernel's forward + backward plus the two transposes.
    """
    k, t = weight.shape[-1], x.shape[1]
    w = weight.squeeze(1).t()  # [k, c]
    xp = F.pad(x, (0, 0, k - 1, 0))
    y = xp[:, k - 1 :] * w[k - 1] if bias is None else torch.addcmul(bias, xp[:, k - 1 :], w[k - 1])
    for i in range(k - 1):
        y = torch.addcmul(y, xp[:, i : i + t], w[i])
    return y


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj -> causal depthwise conv on (x, B, C) -> SiLU -> SSD -> gated RMSNorm -> out_proj."""

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.d_inner = cfg.expand * cfg.d_model
        self.headdim = cfg.headdim
        self.n_heads = self.d_inner // cfg.headdim
        self.n_groups = cfg.n_groups
        self.d_state = cfg.d_state
        self.chunk_size = cfg.chunk_size
        self.eps = cfg.norm_eps
        self.conv_dim = self.d_inner + 2 * cfg.n_groups * cfg.d_state
        self.in_proj = QuantLinear(cfg.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        # Kept as an nn.Conv1d so parameters are named and shaped as in Mamba-2 checkpoints;
        # forward applies it through _causal_depthwise_conv.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, padding=cfg.d_conv - 1
        )
        # Mamba-2 initialisation: dt spread log-uniformly over [1e-3, 1e-1] (bias is its inverse
        # softplus), decay rates A in [1, 16], unit skip.
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = QuantLinear(self.d_inner, cfg.d_model, bias=False)
        self.out_proj.is_residual_out = True  # type: ignore[assignment]

    def forward(self, u: Tensor) -> Tensor:
        """``u [b, t, d] -> [b, t, d]``."""
        b, t, _ = u.shape
        g, n = self.n_groups, self.d_state
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = F.silu(_causal_depthwise_conv(xbc, self.conv1d.weight, self.conv1d.bias))
        x, B, C = xbc.split([self.d_inner, g * n, g * n], dim=-1)
        y = ssd(
            x.reshape(b, t, self.n_heads, self.headdim),
            F.softplus(dt + self.dt_bias),
            -torch.exp(self.A_log),
            B.reshape(b, t, g, n),
            C.reshape(b, t, g, n),
            self.chunk_size,
            D=self.D,
        )
        # Gated RMSNorm, normalised per group (Mamba-2's norm_before_gate=False).
        y = y.reshape(b, t, self.d_inner) * F.silu(z)
        if g == 1:
            y = F.rms_norm(y, (self.d_inner,), weight=self.norm_weight, eps=self.eps)
        else:
            y = F.rms_norm(y.view(b, t, g, self.d_inner // g), (self.d_inner // g,), eps=self.eps)
            y = y.view(b, t, self.d_inner) * self.norm_weight
        return self.out_proj(y)


class Router(QuantLinear):
    """Top-k softmax router: a bias-free linear to expert logits, softmax, top-k.

    ``forward`` returns ``(probs [T, E], topk_weights [T, k], topk_indices [T, k])`` so that a
    forward hook can read routing decisions from ``output[2]``.

    Buffers: ``logit_bias`` (zeros; added to the logits; for fault injection, not saved) and
    ``expert_bias`` (zeros; added to the scores for expert *selection* only, as in DeepSeek-V3's
    aux-loss-free balancing; saved with the model).
    """

    def __init__(self, d_in: int, num_experts: int, top_k: int, norm_topk_prob: bool = True) -> None:
        super().__init__(d_in, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.register_buffer("logit_bias", torch.zeros(num_experts), persistent=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        #: Logits of the latest forward, kept for the z-loss.
        self.last_logits: Tensor | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """Route tokens ``x [T, d_in]``."""
        # logit_bias rides in the GEMM's bias slot: one fused op instead of a GEMM plus an add.
        w = self.weight
        if self.quantize:
            wq = self.prequantized.get("weight")
            xq, amax = fake_quant_nvfp4_amax(x, self.quant_scale)
            observe_quant(self, "act", x, xq, amax)
            if wq is None:
                wq, amax = fake_quant_nvfp4_amax(w, self.quant_scale)
                observe_quant(self, "weight", w, wq, amax)
            x, w = xq, wq
        logits = F.linear(x, w, self.logit_bias)
        self.last_logits = logits
        probs = torch.softmax(logits.float(), dim=-1)
        _, idx = torch.topk(probs.detach() + self.expert_bias, self.top_k, dim=-1)
        weights = probs.gather(-1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, weights, idx


def _grouped_mm_ok(x: Tensor, in_features: int, out_features: int) -> bool:
    """Whether the fused grouped GEMM can be used (CPU kernel, 16-byte-aligned strides)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and in_features % 4 == 0
        and out_features % 4 == 0
    )


class GroupedExperts(nn.Module):
    """``num_experts`` squared-ReLU FFNs stored as stacked weights and run as grouped GEMMs.

    Weights follow ``nn.Linear``'s ``[out, in]`` layout per expert, so NVFP4 blocks run along the
    reduction dim as for every other GEMM. Tokens are sorted by expert and each expert's
    contiguous slice multiplied by its own weight in one grouped GEMM (a loop over experts is the
    fallback where the fused op is unavailable).
    """

    def __init__(self, num_experts: int, d_in: int, ffn: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, d_in))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_in, ffn))
        #: Whether the expert GEMMs are NVFP4 fake-quantised; toggled by ``HybridLM.set_precision``.
        self.quantize: bool = False
        #: Already fake-quantised ``w1``/``w2`` for the current forward (see ``QuantLinear.prequantized``).
        self.prequantized: dict[str, Tensor] = {}
        #: See ``QuantLinear.quant_observer`` / ``QuantLinear.quant_scale``.
        self.quant_observer = None
        self.quant_scale: float = 1.0

    def _gemm(self, x: Tensor, name: str, counts: Tensor, quantize_x: bool) -> Tensor:
        """Per-expert ``x_e @ w_e.T`` over the expert-sorted rows of ``x``, ``w`` the parameter ``name``."""
        w = getattr(self, name)
        if self.quantize:
            wq = self.prequantized.get(name)
            if wq is None:
                wq, amax = fake_quant_nvfp4_amax(w, self.quant_scale)
                observe_quant(self, "weight", w, wq, amax)
            w = wq
            if quantize_x:
                xq, amax = fake_quant_nvfp4_amax(x, self.quant_scale)
                observe_quant(self, "act", x, xq, amax)
                x = xq
        if _grouped_mm_ok(x, w.shape[2], w.shape[1]):
            offs = torch.cumsum(counts, 0).to(torch.int32)
            return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        parts = x.split(counts.tolist())
        return torch.cat([p @ w[e].t() for e, p in enumerate(parts)])

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor, counts: Tensor | None = None) -> Tensor:
        """Combine ``sum_k weights[:, k] * expert_{indices[:, k]}(x)``; ``x [T, d_in]``.

        ``counts`` (assignments per expert, int64) may be passed when the caller has them.
        """
        k = indices.shape[1]
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        if counts is None:
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
        if self.quantize:
            # Quantisation is per row block, so quantising before the gather is identical to
            # quantising the gathered copy, and k times cheaper.
            xq, amax = fake_quant_nvfp4_amax(x, self.quant_scale)
            observe_quant(self, "act", x, xq, amax)
            x = xq
        h = _relu2(self._gemm(x.index_select(0, token), "w1", counts, quantize_x=False))
        out = self._gemm(h, "w2", counts, quantize_x=True)
        out = out * weights.reshape(-1, 1).index_select(0, order).to(out.dtype)
        return torch.zeros_like(x).index_add(0, token, out)


class LatentMoE(nn.Module):
    """LatentMoE: route in model space, run routed experts in a smaller latent space, add a shared expert.

    Tokens are projected ``d_model -> moe_latent_dim`` before dispatch and back after combine,
    which is what makes many experts cheap (the all-to-all and expert GEMMs scale with the latent
    width). The shared expert sees the full-width token.
    """

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.aux_loss_coef = cfg.router_aux_loss_coef
        self.z_loss_coef = cfg.router_z_loss_coef
        self.bias_update_rate = cfg.router_bias_update_rate
        self.router = Router(cfg.d_model, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob)
        self.to_latent = QuantLinear(cfg.d_model, cfg.moe_latent_dim, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, cfg.moe_latent_dim, cfg.moe_ffn)
        self.from_latent = QuantLinear(cfg.moe_latent_dim, cfg.d_model, bias=False)
        self.from_latent.is_residual_out = True  # type: ignore[assignment]
        self.shared_expert = MLP(cfg.d_model, cfg.shared_expert_ffn)
        #: Aux losses of the forwards since the model last cleared it (one per call: MTP calls twice).
        self.aux_losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        """``x [b, t, d] -> [b, t, d]``; appends this call's router aux loss to ``aux_losses``."""
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        probs, weights, indices = self.router(xt)
        flat = indices.reshape(-1)
        counts = torch.zeros(self.num_experts, device=x.device, dtype=torch.long)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        frac = counts.to(probs.dtype) / flat.numel()
        # Switch-style balance loss: E * sum_e f_e * P_e, 1.0 when perfectly balanced.
        aux = self.aux_loss_coef * self.num_experts * torch.sum(frac * probs.mean(0))
        if self.z_loss_coef > 0 and self.router.last_logits is not None:
            aux = (
                aux + self.z_loss_coef * torch.logsumexp(self.router.last_logits.float(), -1).square().mean()
            )
        self.aux_losses.append(aux)
        if self.bias_update_rate > 0 and self.training:
            with torch.no_grad():
                # Under-loaded experts get a higher selection bias, over-loaded a lower one.
                load = counts.to(probs.dtype)
                self.router.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        # The latent projection and the shared expert read the same input: quantise it once.
        pre_q = self.to_latent.quantize and self.shared_expert.up.quantize
        if pre_q:
            xin, amax = fake_quant_nvfp4_amax(xt, self.to_latent.quant_scale)
            observe_quant(self.to_latent, "act", xt, xin, amax)
        else:
            xin = xt
        routed = self.from_latent(self.experts(self.to_latent(xin, pre_q), weights, indices, counts))
        return (routed + self.shared_expert(xin, pre_q)).view(shape)


class Block(nn.Module):
    """Pre-norm residual block: ``h + residual_scale * mixer(norm(h))``.

    ``residual_scale`` is a non-persistent scalar buffer (1.0) for fault injection.
    """

    def __init__(
        self, layer_type: str, index: int, mixer: nn.Module, d_model: int, eps: float = 1e-5
    ) -> None:
        super().__init__()
        #: One of "mamba", "attention", "moe", "mlp".
        self.layer_type = layer_type
        #: Position in its stack (main blocks 0..n-1; MTP blocks continue after the main stack).
        self.index = index
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.mixer = mixer
        self.register_buffer("residual_scale", torch.ones(()), persistent=False)

    @property
    def router(self) -> Router | None:
        """The MoE router of this block, or None for non-MoE blocks."""
        router = getattr(self.mixer, "router", None)
        return router if isinstance(router, Router) else None

    def forward(self, h: Tensor) -> Tensor:
        """Return the residual stream after this block."""
        return torch.addcmul(h, self.residual_scale, self.mixer(self.norm(h)))

    def extra_repr(self) -> str:
        """Show type and index."""
        return f"layer_type={self.layer_type!r}, index={self.index}"


class MTPBlock(nn.Module):
    """Multi-token prediction, DeepSeek-V3 style, with one transformer block shared by all depths.

    Depth ``d`` (1-based) combines the previous depth's hidden state at position t with the
    embedding of token t+d: ``proj_d([norm_h(h); norm_e(emb)])``, runs the shared attention + MoE
    blocks, and predicts token t+1+d through the model's shared output layer. Only the input
    norms/projection are per depth.
    """

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.depths = cfg.mtp_heads
        self.hidden_norms = nn.ModuleList([nn.RMSNorm(d, eps=cfg.norm_eps) for _ in range(self.depths)])
        self.embed_norms = nn.ModuleList([nn.RMSNorm(d, eps=cfg.norm_eps) for _ in range(self.depths)])
        self.projs = nn.ModuleList([QuantLinear(2 * d, d, bias=False) for _ in range(self.depths)])
        n = cfg.n_layers
        self.blocks = nn.ModuleList(
            [
                Block("attention", n, Attention(cfg), d, cfg.norm_eps),
                Block("moe", n + 1, LatentMoE(cfg), d, cfg.norm_eps),
            ]
        )
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)

    def forward(self, hidden: Tensor, next_embed: Tensor, depth: int) -> Tensor:
        """Hidden state of MTP depth ``depth`` (1-based), before the final norm."""
        i = depth - 1
        h = self.projs[i](torch.cat([self.hidden_norms[i](hidden), self.embed_norms[i](next_embed)], dim=-1))
        for block in self.blocks:
            h = block(h)
        return h


class HybridLM(nn.Module):
    """Hybrid Mamba-2 / attention / LatentMoE language model with MTP heads and NVFP4 fake quantisation."""

    def __init__(self, config: HybridConfig | None = None) -> None:
        super().__init__()
        # A private copy: set_precision edits it, and sibling models may share the caller's.
        cfg = dataclasses.replace(config) if config is not None else HybridConfig()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        mixers = {"mamba": Mamba2Mixer, "attention": Attention, "moe": LatentMoE}
        blocks = []
        for i, kind in enumerate(cfg.layer_types):
            mixer = MLP(cfg.d_model, cfg.mlp_ffn) if kind == "mlp" else mixers[kind](cfg)
            blocks.append(Block(kind, i, mixer, cfg.d_model, cfg.norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mtp = MTPBlock(cfg) if cfg.mtp_heads > 0 else None
        self.output = QuantLinear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        self.set_precision(cfg.precision)

    def _init_weights(self) -> None:
        std = self.config.init_std
        # GPT-2 style: branches that write into the residual stream start smaller, so the
        # stream's scale does not grow with depth at initialisation.
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=out_std if getattr(m, "is_residual_out", False) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=1.0)
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.w1, std=std)
                nn.init.normal_(m.w2, std=out_std)

    # ------------------------------------------------------------------ structure helpers

    def moe_layers(self) -> Iterator[LatentMoE]:
        """All LatentMoE mixers, main blocks first, then the MTP block's."""
        for m in self.modules():
            if isinstance(m, LatentMoE):
                yield m

    def routers(self) -> Iterator[tuple[Block, Router]]:
        """``(block, router)`` for every MoE block, main stack then MTP."""
        blocks = list(self.blocks) + (list(self.mtp.blocks) if self.mtp is not None else [])
        for block in blocks:
            if block.router is not None:
                yield block, block.router

    def quantizable_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` for every module with a ``quantize`` flag (QuantLinear, GroupedExperts)."""
        for name, m in self.named_modules():
            if hasattr(m, "quantize"):
                yield name, m

    def set_precision(self, precision: str) -> None:
        """Switch GEMM precision in place: ``"nvfp4"`` quantises blocks ``< n_quant_layers``, ``"bf16"`` none.

        Used to branch a high-precision ablation from an NVFP4 checkpoint: the weights stay, only
        the forward numerics change. The MTP block, embedding, output layer and (unless
        ``quantize_router``) routers always stay high precision. On CPU "bf16" computes in
        float32: it stands for "no FP4 quantisation".
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.config.precision = precision
        for _, m in self.quantizable_modules():
            m.quantize = False  # type: ignore[assignment]
        if precision != "nvfp4":
            return
        for block in self.blocks:
            if block.index >= self.config.n_quant_layers:
                continue
            for m in block.modules():
                if hasattr(m, "quantize") and (self.config.quantize_router or not isinstance(m, Router)):
                    m.quantize = True  # type: ignore[assignment]

    def reset_faults(self) -> None:
        """Zero every ``router.logit_bias``, set every ``block.residual_scale`` and NVFP4 ``quant_scale`` back to 1."""
        with torch.no_grad():
            for m in self.modules():
                if hasattr(m, "quant_scale"):
                    m.quant_scale = 1.0  # type: ignore[assignment]
                if isinstance(m, Router):
                    m.logit_bias.zero_()
                elif isinstance(m, Block):
                    m.residual_scale.fill_(1.0)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Tensor, mtp: bool = True) -> ModelOutput:
        """Run the model on ``input_ids [batch, seq_len + 1 + mtp_heads]``.

        The main head reads the first ``seq_len`` tokens and predicts t+1; MTP depth d predicts
        t+1+d at the same ``seq_len`` positions, hence the extra tokens at the end (what
        ``SyntheticTokens`` provides). With ``mtp=False`` only one extra token is needed and
        ``mtp_losses`` is empty.
        """
        cfg = self.config
        n_mtp = cfg.mtp_heads if (mtp and self.mtp is not None) else 0
        seq = input_ids.shape[1] - 1 - n_mtp
        if seq < 1:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; need at least {n_mtp + 2} (seq + 1 + mtp_heads)"
            )
        for moe in self.moe_layers():
            moe.aux_losses.clear()
        owners = self._prequantize_weights()
        try:
            return self._forward(input_ids, seq, n_mtp)
        finally:
            for m in owners:
                m.prequantized.clear()

    def _prequantize_weights(self) -> list[nn.Module]:
        """Fake-quantise every weight that this forward will quantise, in one fused pass.

        Each weight keeps its own per-tensor scale, so the numbers are those of quantising in
        each layer; it only saves the per-call overhead of ~25 small quantiser calls per step.
        Returns the modules whose ``prequantized`` dict was filled, to be cleared after.
        """
        slots: list[tuple[nn.Module, str]] = []
        for _, m in self.quantizable_modules():
            if not m.quantize:
                continue
            names = ("w1", "w2") if isinstance(m, GroupedExperts) else ("weight",)
            slots.extend((m, name) for name in names)
        if not slots:
            return []
        # A module with a fault-injected scale quantises on its own (the fused pass uses the recipe's).
        fused = [(m, n) for m, n in slots if getattr(m, "quant_scale", 1.0) == 1.0]
        # The amaxes come with the fused pass (its per-tensor scales): the Monitor skips a full read per weight.
        quantized, amaxes = fake_quant_nvfp4_many_amax([getattr(m, name) for m, name in fused])
        for (m, name), q, amax in zip(fused, quantized, amaxes):
            m.prequantized[name] = q  # type: ignore[index]
            observe_quant(m, "weight", getattr(m, name), q, amax)
        return list({id(m): m for m, _ in fused}.values())

    def _forward(self, input_ids: Tensor, seq: int, n_mtp: int) -> ModelOutput:
        """Forward body; see :meth:`forward`."""
        cfg = self.config
        h = self.embedding(input_ids[:, :seq])
        for block in self.blocks:
            h = block(h)
        logits = self.output(self.norm_f(h))
        loss = F.cross_entropy(
            logits.reshape(-1, cfg.vocab_size).float(), input_ids[:, 1 : seq + 1].reshape(-1)
        )

        mtp_losses: list[Tensor] = []
        if n_mtp:
            assert self.mtp is not None
            hd = h
            for d in range(1, n_mtp + 1):
                hd = self.mtp(hd, self.embedding(input_ids[:, d : seq + d]), d)
                mtp_logits = self.output(self.mtp.norm(hd))
                target = input_ids[:, d + 1 : seq + d + 1].reshape(-1)
                mtp_losses.append(F.cross_entropy(mtp_logits.reshape(-1, cfg.vocab_size).float(), target))

        aux_terms = [a for moe in self.moe_layers() for a in moe.aux_losses]
        aux = torch.stack(aux_terms).sum() if aux_terms else loss.new_zeros(())
        total = loss + aux
        if mtp_losses:
            total = total + cfg.mtp_loss_scale * torch.stack(mtp_losses).sum()
        return ModelOutput(loss=loss, mtp_losses=mtp_losses, aux_loss=aux, total_loss=total, logits=logits)
