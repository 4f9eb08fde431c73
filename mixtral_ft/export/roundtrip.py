"""The NF4 round trip of base weights, done the way `load_model` quantizes them: what `merge` folds the adapter into.

merge.py decides which tensors take the round trip; this module computes it, a legacy layer of experts at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixtral_ft.errors import UserError


def nf4_roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    """What `load_model` computes with: NF4 (blocksize 64, double quant) and back, in fp32."""
    from mixtral_ft.model.quant import dequantize_nf4, quantize_nf4

    return dequantize_nf4(quantize_nf4(tensor, "cpu", torch.float32))


class LegacyExperts:
    """NF4 round trip of legacy per-expert tensors, done the way the loader quantizes them.

    `load_model` stacks a layer's 3×E tensors into [E, 2I, H] and [E, H, I] and quantizes each stack as
    one tensor. Per-expert quantization gives the same 64-blocks but not the same double-quant statistics
    (their offset is the mean absmax over the whole tensor): up to 0.02 off on the tiny model. So a
    layer is rebuilt whole, from whichever shards hold its pieces, and the last one is kept for reuse.
    """

    def __init__(self, source: Path, shards: list[Path]):
        from safetensors import safe_open

        index = source / "model.safetensors.index.json"
        if index.exists():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(shards[0]), framework="pt") as reader:
                self.where = dict.fromkeys(reader.keys(), shards[0].name)
        self.experts = json.loads((source / "config.json").read_text())["num_local_experts"]
        self.source, self.layer, self.fused = source, None, None

    def get(self, layer: int, expert: int, which: str) -> torch.Tensor:
        if layer != self.layer:
            self.fused = None  # free the previous layer before building the next
            self.fused, self.layer = self._build(layer), layer
        gate_up, down = self.fused
        inter = down.shape[-1]
        part = {"w1": gate_up[expert, :inter], "w3": gate_up[expert, inter:], "w2": down[expert]}[which]
        return part.clone()

    def _build(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        prefix = f"model.layers.{layer}.block_sparse_moe.experts."
        keys = {k: f for k, f in self.where.items() if k.startswith(prefix)}
        parts = {}
        for file in sorted(set(keys.values())):
            with safe_open(str(self.source / file), framework="pt") as reader:
                parts.update({k: reader.get_tensor(k) for k, f in keys.items() if f == file})
        try:  # fill [E, 2I, H] / [E, H, I] in place, dropping each piece as it is copied
            inter, hidden = parts[f"{prefix}0.w1.weight"].shape
            n, dtype = self.experts, parts[f"{prefix}0.w1.weight"].dtype
            gate_up, down = torch.empty(n, 2 * inter, hidden, dtype=dtype), torch.empty(n, hidden, inter, dtype=dtype)
            for e in range(n):
                gate_up[e, :inter] = parts.pop(f"{prefix}{e}.w1.weight")  # gate_up_proj[e] = w1 over w3
                gate_up[e, inter:] = parts.pop(f"{prefix}{e}.w3.weight")
                down[e] = parts.pop(f"{prefix}{e}.w2.weight")
        except KeyError as exc:
            raise UserError(f"checkpoint lacks {exc.args[0]}: the download is incomplete") from None
        return nf4_roundtrip(gate_up), nf4_roundtrip(down)
