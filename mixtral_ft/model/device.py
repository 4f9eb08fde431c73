"""Where and in what precision a model runs: the device, the compute dtype and the attention kernel, checked
before any download or load, so a wrong flag or recipe value costs one line, not minutes.
"""

from __future__ import annotations

import torch

from mixtral_ft.common import local_rank, why_no_cuda
from mixtral_ft.errors import UserError
from mixtral_ft.model.quant import DTYPES


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def check_device(device: str | torch.device | None) -> torch.device:
    """`device` (None: `default_device()`) if it exists here; a UserError naming --device otherwise."""
    if device is None:
        return default_device()
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device '{device}' is not a device: use cpu or cuda (cuda:N)") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if checked.type == "cuda" and (checked.index or 0) >= gpus:
        found = f"torch sees {gpus} CUDA GPU(s)" if gpus else f"torch sees no CUDA GPU: {why_no_cuda()}"
        raise UserError(f"--device '{device}': {found}; use cpu, or leave --device out")
    return checked


def resolve_compute_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 (fp16 where bf16 is missing) on a CUDA GPU, fp32 on every CPU.

    Not bf16 on a CPU even where it has avx512_bf16/AMX: it trains the tiny recipe no faster there, and the
    results would depend on the CPU (see cpu_bf16.py). A recipe that says `bfloat16` gets it anywhere.
    """
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[name]


def check_attn_implementation(name: str | None, device: str | torch.device | None = None) -> str:
    """`name` (None: sdpa) if it can run here; UserError naming the fix otherwise."""
    import importlib.util

    from mixtral_ft.recipe import ATTN_IMPLEMENTATIONS

    name = name or "sdpa"
    if name not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"attn_implementation '{name}' is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        device = torch.device(device) if device is not None else default_device()
        if device.type != "cuda":
            raise UserError(
                f"attn_implementation flash_attention_2 needs a CUDA GPU: use sdpa (or eager) on {device.type}"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(
                "attn_implementation flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation): install it or use sdpa"
            )
    return name
