"""NF4 storage and compute for Mixtral's fused experts.

transformers 5 stores each layer's experts as two 3-D parameters (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]); bitsandbytes' `load_in_4bit` quantizes only `nn.Linear`, so they would stay
bf16 (2.6 GiB per layer, ~84 GiB for Mixtral). `NF4Experts` replaces transformers' `MixtralExperts`
module: the same forward signature and math, with both weights held as bitsandbytes `Params4bit`
(NF4, blocksize 64, double-quantized statistics: ~0.52 bytes per parameter).

Compute goes through `_NF4GroupedLinear`, a custom autograd function that dequantizes the layer's
weights, runs one grouped GEMM over all experts (`F.grouped_mm`, where a cached probe finds it right for the
device and dtype: grouped_gemm.py; else one matmul per expert), and keeps nothing but a reference to
the packed weights for backward, where it dequantizes again. No bf16 copy of the experts outlives a call
(`configure_experts` can let a checkpointed layer's backward reuse its recompute's copy instead).
"""

from __future__ import annotations

import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

from mixtral_ft.common import fsdp_enabled
from mixtral_ft.errors import UserError
from mixtral_ft.model.cpu_bf16 import apply_forcing, keep_layout
from mixtral_ft.model.grouped_gemm import expert_compute_mode, expert_matmul, stride_aligned
from mixtral_ft.model.layers import decoder_layers

apply_forcing()  # before any Linear4bit is built: MIXTRAL_FT_CPU_BF16 decides what bitsandbytes believes

BLOCKSIZE = 64
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # compute and merge dtypes
STORAGE_DTYPES = {"uint8": torch.uint8, **DTYPES}


def quant_storage_dtype() -> torch.dtype:
    """The dtype the packed NF4 bytes are stored as: uint8, except under FSDP.

    FSDP shards only floating-point parameters (accelerate leaves uint8 `Params4bit` unsharded on every
    GPU; FSDP1's flat parameters need one dtype), so under accelerate's FSDP (`ACCELERATE_USE_FSDP=true`)
    the same bytes are typed bfloat16 (bitsandbytes #1092). `MIXTRAL_FT_QUANT_STORAGE` overrides.
    """
    default = "bfloat16" if fsdp_enabled() else "uint8"
    name = os.environ.get("MIXTRAL_FT_QUANT_STORAGE", default)
    if name not in STORAGE_DTYPES:
        raise UserError(
            f"MIXTRAL_FT_QUANT_STORAGE={name!r} is not a storage dtype: use one of {', '.join(STORAGE_DTYPES)}"
        )
    return STORAGE_DTYPES[name]


def quantize_nf4(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> bnb.nn.Params4bit:
    """NF4-quantize `tensor` on `device`; dequantizing gives `dtype` back."""
    param = bnb.nn.Params4bit(
        tensor.to(dtype),
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=quant_storage_dtype(),
    )
    return param.to(device)  # Params4bit quantizes on its first move to a real device


def prequantized_nf4(packed: torch.Tensor, stats: dict[str, torch.Tensor], device) -> bnb.nn.Params4bit:
    """Rebuild a `Params4bit` from the packed data and the statistics `quantize` wrote."""
    storage = quant_storage_dtype()  # same bytes either way: a float storage is a view of the uint8 ones
    packed = packed.view(storage) if packed.dtype != storage else packed
    return bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device=device)


def dequantize_nf4(param: bnb.nn.Params4bit) -> torch.Tensor:
    return bnbf.dequantize_4bit(param.data, param.quant_state)


def is_4bit(param: torch.Tensor) -> bool:
    return isinstance(param, bnb.nn.Params4bit) and bool(getattr(param, "bnb_quantized", False))


def storage_bytes(param: torch.Tensor) -> int:
    """Bytes a parameter occupies, 4-bit statistics included."""
    size = param.numel() * param.element_size()
    if is_4bit(param):
        size += sum(v.numel() * v.element_size() for v in param.quant_state.as_dict(packed=True).values())
    return size


def logical_numel(param: torch.Tensor) -> int:
    """Parameter count of the unquantized tensor (a packed NF4 tensor holds two per byte)."""
    return param.quant_state.shape.numel() if is_4bit(param) else param.numel()


class _NF4GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ W[e].T for NF4 `W` [E, out, in]; frozen, so only dx is returned.

    By default only a reference to the packed weight is kept and backward dequantizes again. With
    `reuse=True` the dequantized weight is saved for backward instead: under non-reentrant checkpointing
    the first forward's saved tensors are dropped, so it is kept only from the recompute to the layer's
    backward, one layer at a time (2 dequantizations per weight per step instead of 3). Without
    checkpointing it would keep every layer's bf16 experts alive: `configure_experts` allows it only there.
    """

    @staticmethod
    def forward(ctx, x, weight, counts, mode=None, reuse=False):
        dense = dequantize_nf4(weight).to(x.dtype)
        ctx.mode, ctx.reuse = mode, reuse
        if reuse:
            ctx.save_for_backward(counts, dense)
        else:
            ctx.weight = weight  # the packed parameter, alive anyway; no dequantized copy is saved
            ctx.save_for_backward(counts)
        return expert_matmul(x, dense.transpose(1, 2), counts, mode)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reuse:
            counts, dense = ctx.saved_tensors
        else:
            (counts,) = ctx.saved_tensors
            dense = dequantize_nf4(ctx.weight).to(grad_out.dtype)
        return expert_matmul(grad_out.contiguous(), dense, counts, ctx.mode), None, None, None, None


class NF4Experts(nn.Module):
    """Drop-in for transformers' `MixtralExperts`, with `gate_up_proj` / `down_proj` in NF4."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn
        self.register_parameter("gate_up_proj", None)  # set by the loader, one layer at a time
        self.register_parameter("down_proj", None)
        # Speed levers (benchmarks/NOTES.md): grouped GEMM or a loop of per-expert matmuls; reuse of the
        # recompute's dequantized weights in backward (only while the layer is checkpointed).
        self.grouped_mm = True
        self.reuse_dequantized = False

    @classmethod
    def like(cls, experts: nn.Module) -> NF4Experts:
        return cls(experts.num_experts, experts.hidden_dim, experts.intermediate_dim, experts.act_fn)

    def compute_mode(self, dtype: torch.dtype) -> str:
        """The path these experts take on `dtype` inputs (one of `EXPERT_MODES`), deciding it now if need be."""
        aligned = stride_aligned(dtype.itemsize, self.hidden_dim, self.intermediate_dim)
        return expert_compute_mode(self.down_proj.device, dtype) if self.grouped_mm and aligned else "loop"

    def set_weight(self, name: str, param: bnb.nn.Params4bit) -> None:
        expected = {
            "gate_up_proj": (self.num_experts, 2 * self.intermediate_dim, self.hidden_dim),
            "down_proj": (self.num_experts, self.hidden_dim, self.intermediate_dim),
        }[name]
        if tuple(param.quant_state.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(param.quant_state.shape)}, expected {expected}")
        self.register_parameter(name, param)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        # A fixed-size count (bincount's size depends on the data): torch.compile traces it without a graph break.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=expert_ids.device)
        counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
        rows = hidden_states[order // top_k]

        reuse = self.reuse_dequantized and torch.is_grad_enabled()
        mode = None if self.grouped_mm else "loop"  # None: grouped_gemm's decision for the device and dtype
        gate, up = _NF4GroupedLinear.apply(rows, self.gate_up_proj, counts, mode, reuse).chunk(2, dim=-1)
        out = _NF4GroupedLinear.apply(self.act_fn(gate) * up, self.down_proj, counts, mode, reuse)

        # Weight and sum in fp32, then restore token order: deterministic (no atomics), like transformers.
        out = out.float() * top_k_weights.reshape(-1)[order].unsqueeze(-1).float()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = out[inverse].view(num_tokens, top_k, self.hidden_dim).sum(dim=1)
        return out.to(hidden_states.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Same layout as bitsandbytes' Linear4bit: packed data under the name, statistics beside it.
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(self, name)
            if param is None:
                continue
            destination[prefix + name] = param if keep_vars else param.detach()
            for key, value in param.quant_state.as_dict(packed=True).items():
                destination[f"{prefix}{name}.{key}"] = value

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, nf4"


def configure_experts(model, *, grouped_mm: bool = True, reuse_dequantized: bool = False) -> None:
    """Set the expert speed levers on every decoder layer, through any wrapper (peft, DDP, FSDP); reuse only where
    the layer is checkpointed: a layer that is not recomputed would keep its dequantized copy until backward."""
    for layer in decoder_layers(model):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if isinstance(experts, NF4Experts):
            experts.grouped_mm = grouped_mm
            experts.reuse_dequantized = reuse_dequantized and bool(getattr(layer, "gradient_checkpointing", False))


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> bnb.nn.Linear4bit:
    """An empty bitsandbytes NF4 Linear with `linear`'s shape; its weight is set while loading.

    Its weight keeps our layout on every CPU (no bf16 repacking in eval, see `cpu_bf16.keep_layout`).
    """
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=quant_storage_dtype(),
        device="meta",
    )
    keep_layout(layer)
    return layer
