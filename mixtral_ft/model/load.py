"""Load Mixtral for QLoRA: NF4 attention and experts, frozen base, LoRA on the attention projections.

`load_model` is what training, audit, chat and merge use. It never materializes the bf16 model: see
`loader.py` for the streaming and `quant.py` for the NF4 experts. LoRA goes on q/k/v/o only; we do not
call peft's `prepare_model_for_kbit_training`, which would upcast every non-4-bit weight to fp32.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from mixtral_ft.errors import UserError
from mixtral_ft.model.device import check_attn_implementation, check_device, resolve_compute_dtype
from mixtral_ft.model.loader import build_skeleton, finish_model, read_manifest, stream_checkpoint
from mixtral_ft.model.source import ModelSource, check_adapter_folder, model_source, read_adapter_config
from mixtral_ft.recipe import ATTENTION_TARGETS, LM_HEAD_BYPASSED, is_repo_id


def load_model(
    name_or_path: str | Path | ModelSource,
    *,
    quantize_experts: bool = True,
    device: str | torch.device | None = None,
    compute_dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Mixtral with NF4 attention and (unless `quantize_experts=False`) NF4 experts, base frozen.

    `attn_implementation` (sdpa, flash_attention_2, eager; None: sdpa) picks the attention kernel; the
    model config's `sliding_window` is kept as it is, and the kernels honour it.
    """
    from transformers import AutoConfig

    device = check_device(device)  # before a download or a load that takes minutes
    source = model_source(name_or_path, revision)
    path = source.local_path()
    dtype = resolve_compute_dtype(compute_dtype, device)
    attn_implementation = check_attn_implementation(attn_implementation, device)
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = attn_implementation  # read when the model is built (build_skeleton)
    if config.model_type != "mixtral":
        raise UserError(f"'{name_or_path}' is a {config.model_type} model: mixtral_ft fine-tunes Mixtral only")
    manifest = read_manifest(path)
    if manifest is not None:
        check_experts_request(manifest, quantize_experts, name_or_path)
        quantize_experts = manifest["quantize_experts"]  # a pre-quantized folder is what it is
    model = build_skeleton(config, dtype, quantize_experts)
    stream_checkpoint(model, path, device, dtype)
    finish_model(model, device)
    model.requires_grad_(False)
    # peft and the HF Trainer read these flags to treat the model as bitsandbytes-4-bit.
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    model.mixtral_ft_quantize_experts = quantize_experts
    model.name_or_path = str(path)
    return model


def load_recipe_model(model_section, source: ModelSource | None = None) -> nn.Module:
    """The base model a recipe's `model` section describes: the same for training, audit and eval."""
    m = model_section
    return load_model(
        source or model_source(m.name, m.revision),
        quantize_experts=m.quantize_experts,
        compute_dtype=m.compute_dtype,
        attn_implementation=m.attn_implementation,
    )


def adapter_base(adapter: Path) -> tuple[str | None, dict]:
    """The base model an adapter folder was trained on (None if it does not say), and its run's `model` section
    (less `revision` when the base is the local folder, already at that revision).

    The exact folder training loaded if it is still here (no download); else the recipe's model.name; else
    what peft recorded. The raw YAML, not load_recipe: only the model section matters to chat and merge.
    """
    import yaml

    recorded = read_adapter_config(adapter, "adapter").get("base_model_name_or_path")
    recipe_file = adapter / "recipe.yaml"
    try:
        recipe = (yaml.safe_load(recipe_file.read_text()) or {}) if recipe_file.is_file() else {}
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise UserError(
            f"'{recipe_file}' is not valid YAML ({problem}): fix it (checkpoint-N folders hold a copy)"
        ) from None
    model_cfg = (recipe.get("model") or {}) if isinstance(recipe, dict) else {}
    if recorded and Path(recorded).is_dir():  # the snapshot training loaded is that revision: none to pick again
        return recorded, {k: v for k, v in model_cfg.items() if k != "revision"}
    base = model_cfg.get("name") or recorded
    return (str(base) if base else None), model_cfg


def set_adapter_base(adapter: str | Path, base: str) -> None:
    """Record a hub base id in adapter_config.json (peft writes the local folder it loaded)."""
    if not is_repo_id(base) or Path(base).expanduser().exists():
        return  # a local folder or `tiny`: peft's path is the best name there is
    config_file = Path(adapter) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter(model: nn.Module, adapter: str | Path, *, is_trainable: bool = False):
    """peft's PeftModel of `adapter` on `model`; an adapter for another base is one line, not peft's shape dump."""
    from peft import PeftModel

    try:
        return lora_only_saves(PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable))
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise UserError(
            f"adapter '{adapter}' does not fit this base model (its LoRA shapes differ): "
            "pass the base model it was trained on"
        ) from None


def lora_only_saves(peft_model):
    """Every save of `peft_model` writes LoRA tensors only: peft's "auto" adds the base embedding to an embed_tokens
    LoRA's saves (262 MB each on Mixtral) and asks the Hub for a Hub base's config.json at other adapters' saves,
    both for a resized vocabulary, which Mixtral's never is. The Trainer (FSDP and DeepSpeed too) calls this
    object's save_pretrained without `save_embedding_layers`, so its default is set on the instance."""
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
    return peft_model


def check_experts_request(manifest: dict | None, quantize_experts: bool, name: str) -> None:
    """NF4 experts cannot be unquantized back to bf16: asking a pre-quantized folder for bf16 experts is an error."""
    if manifest is not None and manifest["quantize_experts"] and not quantize_experts:
        raise UserError(
            f"'{name}' is pre-quantized with NF4 experts, so they cannot load unquantized "
            "(model.quantize_experts: false, --bf16-experts): use the original checkpoint, or keep them NF4"
        )


def apply_lora(model: nn.Module, lora, *, adapter: str | None = None):
    """Wrap `model` with a trainable LoRA adapter on the recipe's targets (or continue `adapter`)."""
    from peft import LoraConfig, get_peft_model

    if adapter:
        check_adapter_folder(adapter)
        return _refuse_lm_head_lora(load_adapter(model, adapter, is_trainable=True), f"model.adapter '{adapter}'")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    others = [t for t in lora.target_modules if t not in ATTENTION_TARGETS]
    try:
        return lora_only_saves(get_peft_model(model, config))
    except (ValueError, TypeError) as exc:  # allow_other_targets let through a module peft cannot adapt
        if not others:
            raise
        reason = str(exc).splitlines()[0].rstrip("( ")[:160]  # peft may append the module's whole repr
        fix = "adapt linear layers only (q_proj, k_proj, v_proj, o_proj): the router and experts stay frozen"
        if "lora_dropout" in reason:  # the router gate: peft wraps its weight (ParamWrapper), which takes no dropout
            fix = "set lora.dropout: 0"
        raise UserError(f"lora.target_modules {others}: peft cannot put LoRA there ({reason}); {fix}") from None


def check_adapter_targets(adapter: str | Path) -> None:
    """Refuse an adapter folder to continue from (missing, broken, or with LoRA on lm_head) before the model loads.

    A list of names is read here; a regex `target_modules` only shows once peft has matched it (_refuse_lm_head_lora).
    """
    targets = read_adapter_config(adapter).get("target_modules") or []
    if not isinstance(targets, str) and "lm_head" in targets:
        raise UserError(_lm_head_refusal(f"model.adapter '{adapter}'"))


def _refuse_lm_head_lora(model, where: str):
    """A LoRA on the output head, from an adapter trained elsewhere, would sit idle through training."""
    from peft.tuners.lora import LoraLayer

    if isinstance(model.get_output_embeddings(), LoraLayer):
        raise UserError(_lm_head_refusal(where))
    return model


def _lm_head_refusal(where: str) -> str:
    return f"{where} puts LoRA on lm_head: {LM_HEAD_BYPASSED}; continue from an adapter without it"
