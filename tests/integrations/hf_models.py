"""Tiny configurations of the Hugging Face hybrid MoE families, built locally (no hub download).

Each is a few layers of width 64 with 8 experts, top-2, so that a training step takes well under a
second on two CPU cores with transformers' pure-PyTorch Mamba / DeltaNet fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

VOCAB = 256


def nemotron_h() -> nn.Module:
    """Nemotron-H: Mamba-2 (M), MoE (E), attention (*), MLP (-); the FIELD-NOTES config, 6 layers."""
    import transformers as tf

    cfg = tf.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=64, hybrid_override_pattern="ME*E-E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
        ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, expand=2, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
        n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.NemotronHForCausalLM(cfg)


def jamba() -> nn.Module:
    """Jamba: attention / Mamba mixers alternate, every other layer's feed-forward is a MoE."""
    import transformers as tf

    cfg = tf.JambaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=8, max_position_embeddings=256, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return tf.JambaForCausalLM(cfg)


def qwen3_next() -> nn.Module:
    """Qwen3-Next: Gated DeltaNet / attention mixers, MoE MLPs except layer 0 (dense)."""
    import transformers as tf

    cfg = tf.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=False,
    )
    return tf.Qwen3NextForCausalLM(cfg)


def granitemoehybrid() -> nn.Module:
    """GraniteMoeHybrid: Mamba-2 / attention mixers, every layer with a MoE plus a shared MLP."""
    import transformers as tf

    cfg = tf.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, shared_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, max_position_embeddings=256,
        pad_token_id=0, tie_word_embeddings=False,
    )
    return tf.GraniteMoeHybridForCausalLM(cfg)


#: family → (builder, expected layer types, router path inside a layer, experts module path).
FAMILIES: dict[str, tuple[Callable[[], nn.Module], list[str], str, str]] = {
    "nemotron_h": (nemotron_h, ["mamba", "moe", "attention", "moe", "mlp", "moe"], "mixer.gate", "mixer.experts"),
    "jamba": (jamba, ["attention", "moe", "attention", "moe"], "feed_forward.router", "feed_forward.experts"),
    "qwen3_next": (qwen3_next, ["mamba", "moe", "moe", "moe"], "mlp.gate", "mlp.experts"),
    "granitemoehybrid": (granitemoehybrid, ["moe", "moe", "moe"], "block_sparse_moe.router",
                         "block_sparse_moe.experts"),
}
