"""A trained LoRA adapter's weights as the merge folds them: {base weight name: (A, B, scale)}.

Only plain LoRA, whose delta is exactly scale·B·A, is read; settings that change that (DoRA, biases, per-module
ranks, ...) are refused in one line, since folding them as plain LoRA would write a different model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixtral_ft.errors import UserError

UNSUPPORTED_LORA = (  # adapter_config.json settings whose weights are not plain scale·B·A
    "use_dora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "fan_in_fan_out",
)


def read_lora(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{checkpoint weight name: (A, B, scale)} for a plain LoRA adapter; anything fancier is refused."""
    from safetensors.torch import load_file

    from mixtral_ft.model.source import read_adapter_config

    cfg = read_adapter_config(adapter, "adapter")
    unsupported = [k for k in UNSUPPORTED_LORA if cfg.get(k)]
    if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise UserError(
            f"adapter '{adapter}' uses {unsupported or cfg.get('peft_type')}: merge folds plain LoRA on linear "
            "layers and embed_tokens only; use the adapter unmerged (chat or eval --adapter, push)"
        )
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"adapter folder '{adapter}' has no adapter_model.safetensors")
    state = load_file(str(weights))
    lora = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module, b = key.split(".lora_A.")[0], state[key.replace(".lora_A.", ".lora_B.")]
        elif key.endswith(".lora_embedding_A"):  # embed_tokens: A is [r, vocab], B [hidden, r], the delta (B·A)ᵀ
            module, b = key.removesuffix(".lora_embedding_A"), state[key.removesuffix("A") + "B"]
            a, b = b.T, a.T  # Bᵀ is [r, hidden] and Aᵀ [vocab, r]: B·A below is then the [vocab, hidden] delta
        else:
            continue
        module = module.removeprefix("base_model.model.")
        r = a.shape[0]
        # peft's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA.
        scale = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
        lora[module + ".weight"] = (a.float(), b.float(), scale)
    if not lora:
        raise UserError(f"adapter '{adapter}' holds no LoRA weights")
    return lora
