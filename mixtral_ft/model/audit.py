"""The parameter audit: proof of what is 4-bit, what is frozen, and what it costs in memory.

Groups every parameter (embeddings, attention, router, experts, norms, lm_head, LoRA) with its dtypes,
storage bytes (4-bit statistics included), logical count and trainable count. The audit fails when an
attention or expert weight is not 4-bit (experts may be bf16 when the recipe says
`quantize_experts: false`) or when anything but LoRA is trainable. Training runs it before step one. It also
records how the NF4 experts compute (`expert_compute`: grouped, grouped-contiguous or loop; see grouped_gemm.py).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mixtral_ft.common import human_bytes
from mixtral_ft.model.quant import NF4Experts, dequantize_nf4, is_4bit, logical_numel, storage_bytes

GROUPS = ("embeddings", "attention", "router", "experts", "norms", "lm_head", "lora", "other")


@dataclass
class GroupRow:
    group: str
    dtypes: set[str] = field(default_factory=set)
    storage_bytes: int = 0
    params: int = 0
    trainable: int = 0
    tensors: int = 0
    four_bit_tensors: int = 0


@dataclass
class AuditReport:
    rows: list[GroupRow]
    failures: list[str]
    notes: list[str]
    expert_compute: str | None = None  # grouped_gemm.EXPERT_MODES; None: the experts are not NF4

    @property
    def ok(self) -> bool:
        return not self.failures

    def row(self, group: str) -> GroupRow:
        return next(r for r in self.rows if r.group == group)

    def expert_bytes_per_param(self) -> float:
        experts = self.row("experts")
        return experts.storage_bytes / max(experts.params, 1)

    def to_json(self) -> str:
        rows = [{**asdict(r), "dtypes": sorted(r.dtypes)} for r in self.rows]
        return json.dumps(
            {
                "ok": self.ok,
                "rows": rows,
                "failures": self.failures,
                "notes": self.notes,
                "expert_bytes_per_param": round(self.expert_bytes_per_param(), 4),
                "expert_compute": self.expert_compute,
            },
            indent=2,
        )

    def table(self) -> str:
        lines = [f"{'group':<11} {'dtype':<14} {'storage':>10} {'params':>14} {'trainable':>12}"]
        for r in self.rows:
            if r.tensors:
                lines.append(
                    f"{r.group:<11} {'/'.join(sorted(r.dtypes)):<14} {human_bytes(r.storage_bytes):>10} "
                    f"{r.params:>14,} {r.trainable:>12,}"
                )
        total = sum(r.storage_bytes for r in self.rows)
        lines.append(
            f"{'total':<11} {'':<14} {human_bytes(total):>10} {sum(r.params for r in self.rows):>14,} "
            f"{sum(r.trainable for r in self.rows):>12,}"
        )
        experts = self.row("experts")
        if experts.tensors:
            lines.append(f"experts: {self.expert_bytes_per_param():.3f} bytes/param")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"FAIL: {f}" for f in self.failures] or ["audit: ok"]
        return "\n".join(lines)


def classify(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if "self_attn" in name:
        return "attention"
    if ".experts." in name or name.endswith(".experts"):
        return "experts"
    if ".mlp.gate." in name or "block_sparse_moe.gate" in name:
        return "router"
    if "norm" in name:
        return "norms"
    return "other"


def audit_model(model: nn.Module, *, quantize_experts: bool | None = None) -> AuditReport:
    if quantize_experts is None:
        quantize_experts = getattr(_base(model), "mixtral_ft_quantize_experts", True)
    rows = {g: GroupRow(g) for g in GROUPS}
    failures: list[str] = []
    for name, param in model.named_parameters():
        group = classify(name)
        row = rows[group]
        four = is_4bit(param)
        row.dtypes.add("nf4" if four else str(param.dtype).removeprefix("torch."))
        row.storage_bytes += storage_bytes(param)
        row.params += logical_numel(param)
        row.tensors += 1
        row.four_bit_tensors += int(four)
        if param.requires_grad:
            row.trainable += param.numel()
            if group != "lora":
                failures.append(f"{name} is trainable: only LoRA weights may train")
        must_be_4bit = group == "attention" or (group == "experts" and quantize_experts)
        if must_be_4bit and not four:
            failures.append(f"{name} is {param.dtype}, not 4-bit")
    notes = []
    if not quantize_experts:
        dtypes = "/".join(sorted(rows["experts"].dtypes))
        notes.append(
            f"experts kept unquantized ({dtypes}) as model.quantize_experts: false asks: "
            "~90 GB in bf16 for Mixtral, an H200-class GPU"
        )
    if rows["experts"].tensors == 0:
        failures.append("no expert weights found: is this a Mixtral model?")
    return AuditReport([rows[g] for g in GROUPS], failures[:20], notes, expert_compute(model))


def expert_compute(model: nn.Module) -> str | None:
    """How `model`'s NF4 experts compute (None: none are NF4), probing grouped GEMM now if not yet done."""
    experts = next((m for m in model.modules() if isinstance(m, NF4Experts)), None)
    return experts.compute_mode(model.get_input_embeddings().weight.dtype) if experts else None


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base else model


def dequantized_reference(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' own Mixtral in `dtype`, holding exactly the weights our NF4 model computes with: the reference
    our experts' forward and gradients are checked against (tests, benchmarks/cuda_checks.py)."""
    from transformers import MixtralForCausalLM

    reference = MixtralForCausalLM(copy.deepcopy(model.config)).to(model.device, dtype)
    state = {name: (dequantize_nf4(p) if is_4bit(p) else p).detach().to(dtype) for name, p in model.named_parameters()}
    result = reference.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the reference does not take this model's weights: {result}")
    return reference.eval()
