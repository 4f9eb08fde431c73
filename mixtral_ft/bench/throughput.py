"""Throughput and memory benchmark of our model: full-width Mixtral built straight into NF4.

    mixtral-ft bench [--layers 32] [--batch 2 8] [--seq 2048] [--out-dir DIR]   # on a GPU
    mixtral-ft bench --device cpu --tiny                                        # CI smoke run

No 93 GB checkpoint is needed: each weight is drawn on the device and quantized at once, so building
costs one layer of bf16 experts at a time. Then QLoRA steps run through `mixtral_ft.bench.steps`, and one
result file per run is written to `<out-dir>/<date>-<device>[-<tag>].json` (default out-dir: ./bench-results
in the current folder): tok/s, step time, peak memory and HFU (against a bf16 matmul peak measured in the
same run) for each batch, and whether the run completed (`mixtral_ft.bench.results`). The speed levers of
benchmarks/NOTES.md are options, so each can be measured on its own. The peers (transformers 4.57 and stock
transformers 5) are measured beside ours by benchmarks/compare.py, outside the package, which reuses these functions.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from mixtral_ft.bench import steps
from mixtral_ft.bench.args import model_config, parse_args
from mixtral_ft.bench.results import new_report, open_result, record, recording, write_report
from mixtral_ft.model.loader import build_skeleton, finish_model
from mixtral_ft.model.quant import NF4Experts, configure_experts, quantize_nf4
from mixtral_ft.model.torch_compile import compile_layers, compile_report

DEFAULT_LEVERS = {
    "checkpointing": True,
    "skip_layers": 0,
    "experts": "grouped",
    "reuse_dequantized": False,
    "lora_dropout": 0.0,
    "liger": False,
    "compile": False,
}


# The levers whose memory `mixtral-ft plan` models; a run that changes only these can be checked against plan.
PLANNED_LEVERS = ("checkpointing", "skip_layers", "reuse_dequantized")


def plan_covers(levers: dict) -> bool:
    return all(levers.get(k, v) == v for k, v in DEFAULT_LEVERS.items() if k not in PLANNED_LEVERS)


def build_random_nf4(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Mixtral with random weights, attention and experts in NF4, built one tensor at a time on `device`."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    std = config.initializer_range
    model = build_skeleton(config, dtype, quantize_experts=True)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = steps.random_weight((module.out_features, module.in_features), device, dtype, std)
            module.weight = quantize_nf4(weight, device, dtype)
        elif isinstance(module, NF4Experts):
            e, h, i = module.num_experts, module.hidden_dim, module.intermediate_dim
            for name, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
                dense = steps.random_weight(shape, device, dtype, std)
                module.set_weight(name, quantize_nf4(dense, device, dtype))
                del dense  # one bf16 expert tensor alive at a time
    steps.fill_meta_params(model, device, dtype, std)
    finish_model(model, device)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True
    return model


def step_flops(config, tokens: int, seq: int, recomputed_layers: int) -> float:
    """Executed FLOPs per step: forward, the recompute of checkpointed layers, and input-gradient backward.

    The base is frozen, so backward computes activation gradients only (one matmul per forward matmul).
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = tokens * (2 * (h * h * 2 + h * kv * 2) + 2 * config.num_experts_per_tok * 3 * h * i + 2 * 2 * seq * h)
    forward = layers * per_layer + tokens * 2 * h * config.vocab_size
    return 2 * forward + recomputed_layers * per_layer


def apply_levers(model, levers: dict):
    """Checkpointing, expert compute, fused kernels and LoRA, as `levers` says (DEFAULT_LEVERS: our defaults)."""
    if levers["checkpointing"]:
        steps.enable_checkpointing(model, levers["skip_layers"])
    configure_experts(model, grouped_mm=levers["experts"] == "grouped", reuse_dequantized=levers["reuse_dequantized"])
    if levers["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_mixtral

        # Its SwiGLU patch would replace our NF4 experts' forward with a dense one, so it stays off.
        apply_liger_kernel_to_mixtral(model=model, swiglu=False)
    model = steps.add_lora(model, dropout=levers["lora_dropout"])
    if levers["compile"]:
        compile_layers(model)
    return model


def run_benchmark(
    *,
    layers: int,
    batch: int,
    seq: int,
    steps_: int,
    warmup: int,
    device: torch.device,
    tiny: bool,
    levers: dict | None = None,
    profile_to: Path | None = None,
) -> dict:
    from mixtral_ft.model.device import resolve_compute_dtype

    levers = DEFAULT_LEVERS | (levers or {})
    dtype = resolve_compute_dtype("auto", device)
    config = model_config(tiny, layers)
    steps.reset_peak(device)
    started = time.perf_counter()
    model = build_random_nf4(config, device, dtype)
    build_s = time.perf_counter() - started
    weights_gib, build_peak = steps.allocated_gib(device), steps.peak_gib(device)
    groups = steps.weight_gib_by_group(model)
    model = apply_levers(model, levers)
    result = steps.time_qlora_steps(
        model,
        batch=batch,
        seq=seq,
        vocab_size=config.vocab_size,
        steps=steps_,
        warmup=warmup,
        device=device,
        profile_to=profile_to,
    )
    del model
    peak_tflops = steps.matmul_peak_tflops(device, dtype)
    recomputed = max(config.num_hidden_layers - levers["skip_layers"], 0) if levers["checkpointing"] else 0
    achieved = step_flops(config, batch * seq, seq, recomputed) / result["step_s"] / 1e12
    return {
        "model": "tiny" if tiny else "mixtral-8x7b-shape",
        "layers": config.num_hidden_layers,
        "batch": batch,
        "seq": seq,
        "dtype": str(dtype).removeprefix("torch."),
        "levers": levers,
        "build_s": round(build_s, 2),
        "build_peak_gib": round(build_peak, 3),
        "weights_gib": weights_gib and round(weights_gib, 3),
        "weights_gib_by_group": groups,
        **result,
        "matmul_peak_tflops": round(peak_tflops, 1),
        "hfu": round(achieved / peak_tflops, 4),
        **({"compile": compile_report()} if levers["compile"] else {}),
    }


def free_memory(device: torch.device) -> None:
    # A reference cycle (accelerate's hooks on a stock model, say) would keep the last model allocated while the
    # next is built, and in its peak: collect before giving the cache back.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_ours(args, batch: int, device: torch.device, path: Path | None = None, layers: int | None = None) -> dict:
    """Our model at `batch` (and `layers`, default --layers); the memory is given back afterwards. With --profile,
    the op table goes beside the result file `path`."""
    profile = path.with_name(f"{path.stem}-b{batch}-profile.txt") if args.profile and path else None
    ours = run_benchmark(
        layers=layers or args.layers,
        batch=batch,
        seq=args.seq,
        steps_=args.steps,
        warmup=args.warmup,
        device=device,
        tiny=args.tiny,
        levers=args.levers,
        profile_to=profile,
    )
    free_memory(device)
    return ours


def summary(ours: dict) -> str:
    return (
        f"B{ours['batch']} x S{ours['seq']}, {ours['layers']} layers: {ours['tok_per_s']:,.0f} tok/s, "
        f"peak {ours['peak_gib']:.2f} GiB, HFU {ours['hfu']:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # upstream deprecations, not the user's to fix
    args = parse_args(argv)
    device = torch.device(args.device)
    report = new_report(args, device)
    path = open_result(args, report)
    try:
        with recording(report, path) as progress:  # each batch is in the file once measured; a stop says so in it
            for batch in args.batch:
                progress.batch = batch
                ours = run_ours(args, batch, device, path)
                record(report, ours)
                print(summary(ours), flush=True)
                write_report(report, path)
    except torch.OutOfMemoryError:  # said in one line by recording() (and in the file): no traceback
        return 1
    print(f"wrote {path}", flush=True)
    return 0
