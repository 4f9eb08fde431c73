"""Model shapes in one place: Mixtral-8x7B's (at any depth) and the built-in tiny one's, as overrides of it."""

from __future__ import annotations

# mistralai/Mixtral-8x7B-v0.1's config.json (the Hub's rope_theta, no sliding window).
MIXTRAL_8X7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "sliding_window": None,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# The same architecture, vocabulary and tokenizer, small enough for a CPU: 2 layers, 4 experts, top-2.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "router_aux_loss_coef": 0.0,
    # 0.02 leaves a random lm_head so flat that attention-only LoRA can barely move the loss;
    # a wider init lets the tiny model show learning on a repeated sample within 20 steps.
    "initializer_range": 0.2,
    "output_router_logits": False,
}


def mixtral_config(layers: int = 32, **overrides):
    """Mixtral-8x7B's shape with `layers` decoder layers; `overrides` change any other key (test shapes)."""
    from transformers import MixtralConfig

    return MixtralConfig(**{**MIXTRAL_8X7B, "num_hidden_layers": layers, **overrides})


def tiny_config(**overrides):
    """The built-in tiny Mixtral's shape (model.name: tiny)."""
    from transformers import MixtralConfig

    return MixtralConfig(**{**MIXTRAL_8X7B, **TINY, **overrides})
