"""Load Mixtral straight into NF4, one tensor or one layer at a time, from any of three layouts.

- the Hub's legacy per-expert tensors (`block_sparse_moe.experts.E.w1/w2/w3.weight`);
- transformers 5's fused 3-D experts (`mlp.experts.gate_up_proj` / `down_proj`);
- our pre-quantized NF4 folders (`mixtral-ft quantize`), marked by `mixtral_ft_nf4.json`.

The model skeleton is built on the meta device, so nothing is allocated until a checkpoint tensor
arrives; each attention weight is quantized as it is read, and each layer's experts as soon as the
last of them is read. Peak memory is the final footprint plus one layer of bf16 experts.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from mixtral_ft.errors import UserError
from mixtral_ft.model.quant import NF4Experts, nf4_linear, prequantized_nf4, quantize_nf4
from mixtral_ft.recipe import ATTENTION_TARGETS

MANIFEST = "mixtral_ft_nf4.json"
LEGACY_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
LEGACY_ROUTER = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")
STAT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def stream_checkpoint(model: nn.Module, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fill the meta-device `model` from the safetensors shards in `path`."""
    from safetensors import safe_open

    experts = _ExpertAssembler(model, device, dtype)
    for shard in checkpoint_shards(path):
        stats: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        with safe_open(str(shard), framework="pt", device="cpu") as reader:
            # A packed NF4 tensor is known by its statistics beside it, whatever its storage dtype.
            packed = {owner[0] for owner in map(_stat_owner, reader.keys()) if owner}
            for key in reader.keys():
                stat_owner = _stat_owner(key)
                if stat_owner:
                    stats[stat_owner[0]][stat_owner[1]] = reader.get_tensor(key)
                    continue
                if key in packed:
                    stats[key]["__data__"] = reader.get_tensor(key)
                    continue
                _place(model, key, reader.get_tensor(key), device, dtype, experts)
        for name, parts in stats.items():  # quantize writes a tensor and its statistics in one shard
            data = parts.pop("__data__")
            _set_module_param(model, name, prequantized_nf4(data, parts, device))
    experts.finish()


def checkpoint_shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise UserError(
        f"no safetensors weights in '{path}': expected model.safetensors or an index (.bin is not supported)"
    )


def _stat_owner(key: str) -> tuple[str, str] | None:
    for suffix in STAT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _place(model, key, tensor, device, dtype, experts: _ExpertAssembler) -> None:
    match = LEGACY_EXPERT.match(key)
    if match:
        experts.add_legacy(int(match[1]), int(match[2]), match[3], tensor)
        return
    key = LEGACY_ROUTER.sub(r"\1.mlp.gate.weight", key)
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise UserError(f"checkpoint tensor '{key}' does not belong to a Mixtral model: check model.name") from None
    if isinstance(module, NF4Experts) or type(module).__name__ == "MixtralExperts":
        experts.set_fused(module, attr, tensor)
    elif getattr(module, "weight", None) is not None and type(module).__name__ == "Linear4bit":
        module.weight = quantize_nf4(tensor, device, dtype)
    else:
        _set_module_param(model, key, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def _set_module_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, NF4Experts):
        module.set_weight(attr, param)
    else:
        module._parameters[attr] = param


class _ExpertAssembler:
    """Collects a layer's legacy per-expert tensors into one [E, ...] buffer, then quantizes it."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.pending: dict[int, dict] = {}

    def add_legacy(self, layer: int, expert: int, which: str, tensor: torch.Tensor) -> None:
        module = self.model.model.layers[layer].mlp.experts
        inter = module.intermediate_dim
        if layer not in self.pending:
            shape_gu = (module.num_experts, 2 * inter, module.hidden_dim)
            shape_d = (module.num_experts, module.hidden_dim, inter)
            self.pending[layer] = {
                "gate_up_proj": torch.empty(shape_gu, dtype=tensor.dtype),
                "down_proj": torch.empty(shape_d, dtype=tensor.dtype),
                "seen": set(),
            }
        slot = self.pending[layer]
        if which == "w2":
            slot["down_proj"][expert].copy_(tensor)
        else:  # gate_up_proj[e] is w1 (gate) stacked over w3 (up)
            half = slice(0, inter) if which == "w1" else slice(inter, 2 * inter)
            slot["gate_up_proj"][expert, half].copy_(tensor)
        slot["seen"].add((expert, which))
        if len(slot["seen"]) == 3 * module.num_experts:
            del self.pending[layer]
            self.set_fused(module, "gate_up_proj", slot["gate_up_proj"])
            self.set_fused(module, "down_proj", slot["down_proj"])

    def set_fused(self, module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        if isinstance(module, NF4Experts):
            module.set_weight(name, quantize_nf4(tensor, self.device, self.dtype))
        else:
            module._parameters[name] = nn.Parameter(tensor.to(self.device, self.dtype), requires_grad=False)

    def finish(self) -> None:
        if self.pending:
            layer, slot = next(iter(self.pending.items()))
            raise UserError(
                f"checkpoint is missing experts of layer {layer} ({len(slot['seen'])} of "
                f"{3 * self.model.config.num_local_experts} tensors found): the download is incomplete"
            )


def build_skeleton(config, dtype: torch.dtype, quantize_experts: bool) -> nn.Module:
    """Mixtral on the meta device with NF4 attention (and experts) modules in place."""
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(dtype)
    for layer in model.model.layers:
        for name in ATTENTION_TARGETS:
            setattr(layer.self_attn, name, nf4_linear(getattr(layer.self_attn, name), dtype))
        if quantize_experts:
            layer.mlp.experts = NF4Experts.like(layer.mlp.experts)
    return model


def finish_model(model: nn.Module, device: torch.device) -> None:
    """Recreate the non-persistent buffers (rotary frequencies) and check nothing was left unloaded."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    with torch.device(device):
        model.model.rotary_emb = MixtralRotaryEmbedding(model.config)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p is None or p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    for module_name, module in model.named_modules():
        if isinstance(module, NF4Experts) and (module.gate_up_proj is None or module.down_proj is None):
            missing.append(f"{module_name}.gate_up_proj/down_proj")
    if missing:
        raise UserError(
            f"checkpoint lacks {len(missing)} tensors (first: {missing[0]}): the download is "
            "incomplete or the folder is not a Mixtral checkpoint"
        )


def save_prequantized(model: nn.Module, out_dir: Path, *, source: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model`'s NF4 state as safetensors shards + index; `load_model` reads it without quantizing."""
    from safetensors.torch import save_file

    state = model.state_dict()
    groups: dict[str, list[str]] = defaultdict(list)  # a tensor and its statistics stay in one shard
    for key in state:
        owner = _stat_owner(key)
        groups[owner[0] if owner else key].append(key)
    shards, current, size = [], {}, 0
    for keys in groups.values():
        group_size = sum(state[k].numel() * state[k].element_size() for k in keys)
        if current and size + group_size > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        for k in keys:
            current[k] = state[k].detach().to("cpu").contiguous()
        size += group_size
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    experts_nf4 = any(isinstance(m, NF4Experts) for m in model.modules())
    manifest = {
        "format": "mixtral_ft-nf4",
        "version": 1,
        "blocksize": 64,
        "double_quant": True,
        "quantize_experts": experts_nf4,
        "source": source,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    return json.loads(file.read_text()) if file.exists() else None
