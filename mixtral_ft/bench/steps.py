"""The timing harness every benchmark shares: ours and the peers run the same QLoRA steps, timed the same way.

It imports torch and peft (transformers only when asked for its decoder layers), so the transformers 4.57
peer (`peer_v4.py`, run in a side environment) measures through exactly this code: LoRA r16 on q/k/v/o,
non-reentrant gradient checkpointing, AdamW, random tokens as input and labels, `warmup` untimed steps, then
the median of the timed ones. Peak memory counts from the first step, after the model is built (as
../shared/bench measured the peers).
"""

from __future__ import annotations

import statistics
import time

import torch

from mixtral_ft.common import current_gib, peak_gib, reset_peak
from mixtral_ft.model.layers import keep_last_layers_whole
from mixtral_ft.recipe import ATTENTION_TARGETS

LORA_TARGETS = list(ATTENTION_TARGETS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_gib(device: torch.device) -> float | None:
    """Tensors allocated on a GPU; None on CPU, where the process's RSS would say nothing about the weights."""
    return current_gib(device) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput: the denominator of HFU."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def add_lora(model, dropout: float = 0.0):
    """peft LoRA r16 / alpha 32 on the attention projections, the adapter every benchmark trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def enable_checkpointing(model, skip_layers: int = 0) -> None:
    """Non-reentrant checkpointing of every decoder layer but the last `skip_layers` (kept whole: no recompute)."""
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    keep_last_layers_whole(model, skip_layers)


def random_weight(shape, device: torch.device, dtype: torch.dtype, std: float) -> torch.Tensor:
    """Normal(0, std) weights of `dtype`; on CPU drawn in fp32 and cast, so a seed gives the same model on any torch.

    torch 2.11's CPU bf16 sampler draws other numbers than fp32-then-cast (their std: 0.993); 2.13 casts.
    On a GPU they are drawn in `dtype`: an fp32 draw would double the transient memory of one expert tensor.
    """
    draw_dtype = torch.float32 if device.type == "cpu" else dtype
    return (torch.randn(shape, device=device, dtype=draw_dtype) * std).to(dtype)


def fill_meta_params(model, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Give every parameter still on the meta device random weights (norms: ones), frozen, on `device`."""
    from torch import nn

    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = (
                    torch.ones(param.shape, device=device, dtype=dtype)
                    if "norm" in f"{module_name}.{name}"
                    else random_weight(param.shape, device, dtype, std)
                )
                module._parameters[name] = nn.Parameter(value, requires_grad=False)


def weight_gib_by_group(model) -> dict:
    """Storage of the experts, the attention and everything else, as the audit groups it (NF4 statistics counted).

    Ours and the stock v5 peer report their weights through this; the v4 peer never calls it (the audit needs
    transformers 5), so the import stays inside.
    """
    from mixtral_ft.model.audit import audit_model

    rows = {row.group: row.storage_bytes for row in audit_model(model, quantize_experts=False).rows}
    experts, attention = rows.pop("experts"), rows.pop("attention")
    # to 1 KiB: the tiny CPU model's groups must not round to zero
    return {
        group: round(size / 2**30, 6)
        for group, size in (("experts", experts), ("attention", attention), ("other", sum(rows.values())))
    }


def time_qlora_steps(
    model, *, batch: int, seq: int, vocab_size: int, steps: int, warmup: int, device: torch.device, profile_to=None
) -> dict:
    """Train `model` (LoRA already applied) for warmup + steps AdamW steps on random tokens; time the last `steps`.

    `profile_to`, a path, gets the op table of one more step recorded with torch.profiler.
    """
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(3, vocab_size, (batch, seq), device=device)
    reset_peak(device)
    times, loss = [], None
    for step in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = _step(model, optimizer, ids)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if profile_to is not None:  # one more step, untimed: the profiler's own overhead stays out of the numbers
        with _profiler(device) as profiler:
            _step(model, optimizer, ids)
            sync(device)
        _write_profile(profiler, device, profile_to)
    step_s = statistics.median(times)
    return {
        "step_s": round(step_s, 4),
        "tok_per_s": round(batch * seq / step_s, 1),
        "peak_gib": round(peak_gib(device), 3),
        "loss": round(float(loss.detach()), 4),
    }


def _step(model, optimizer, ids) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=False)


def _write_profile(profiler, device: torch.device, path) -> None:
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=60)
    with open(path, "w") as out:
        out.write(table + "\n")
