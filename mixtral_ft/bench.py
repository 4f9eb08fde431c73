"""Throughput and memory benchmark: full-width Mixtral built straight into NF4 with random weights.

    mixtral-ft bench [--layers 32] [--batch 2] [--seq 2048] [--steps 3]   # on a GPU
    mixtral-ft bench --device cpu --tiny                                  # CI smoke run

No 93 GB checkpoint is needed: each weight is drawn on the device and quantized at once, so building
costs one layer of bf16 experts at a time. Then QLoRA steps (LoRA r16 on q/k/v/o, dropout 0, gradient
checkpointing) run in a plain loop, the way the peers in ../shared/bench were measured, and the result
(tok/s, step time, peak memory, HFU against a bf16 matmul peak measured in the same run) is written to
`benchmarks/results/<date>-<device>.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

from mixtral_ft.loader import build_skeleton, finish_model
from mixtral_ft.quant import NF4Experts, quantize_nf4

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def mixtral_config(layers: int):
    """Mixtral-8x7B's shape (mistralai/Mixtral-8x7B-v0.1 config.json), with `layers` decoder layers."""
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
                         rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_random_nf4(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Mixtral with random weights, attention and experts in NF4, built one tensor at a time on `device`."""
    import bitsandbytes as bnb
    from torch import nn

    torch.manual_seed(seed)
    std = config.initializer_range
    model = build_skeleton(config, dtype, quantize_experts=True)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = torch.randn(module.out_features, module.in_features, device=device, dtype=dtype) * std
            module.weight = quantize_nf4(weight, device, dtype)
        elif isinstance(module, NF4Experts):
            e, h, i = module.num_experts, module.hidden_dim, module.intermediate_dim
            for name, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
                dense = torch.randn(shape, device=device, dtype=dtype) * std
                module.set_weight(name, quantize_nf4(dense, device, dtype))
                del dense  # one bf16 expert tensor alive at a time
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                init = torch.ones if "norm" in f"{module_name}.{name}" else lambda s, **kw: torch.randn(s, **kw) * std
                module._parameters[name] = nn.Parameter(init(param.shape, device=device, dtype=dtype),
                                                        requires_grad=False)
    finish_model(model, device)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True
    return model


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput: the denominator of HFU."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def step_flops(config, tokens: int, seq: int, checkpointing: bool) -> float:
    """Executed FLOPs per step: forward, recompute (with checkpointing) and input-gradient backward.

    The base is frozen, so backward computes activation gradients only (one matmul per forward matmul).
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = 2 * (h * h * 2 + h * kv * 2) + 2 * config.num_experts_per_tok * 3 * h * i + 2 * 2 * seq * h
    forward = tokens * (layers * per_layer + 2 * h * config.vocab_size)
    return forward * (3 if checkpointing else 2)


def run_benchmark(*, layers: int, batch: int, seq: int, steps: int, warmup: int, device: torch.device,
                  tiny: bool, checkpointing: bool = True) -> dict:
    from mixtral_ft.model import apply_lora, peak_memory_gib, resolve_compute_dtype
    from mixtral_ft.recipe import LoraSection
    from mixtral_ft.tiny import tiny_config

    dtype = resolve_compute_dtype("auto", device)
    config = tiny_config() if tiny else mixtral_config(layers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model = build_random_nf4(config, device, dtype)
    build_s = time.perf_counter() - started
    weights_gib = _allocated_gib(device)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, LoraSection(r=16, alpha=32, dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(3, config.vocab_size, (batch, seq), device=device)
    times, loss = [], None
    for step in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak_tflops = matmul_peak_tflops(device, dtype)
    achieved = step_flops(config, batch * seq, seq, checkpointing) / step_s / 1e12
    return {
        "date": dt.date.today().isoformat(), "device": _device_name(device), "versions": _versions(),
        "model": "tiny" if tiny else "mixtral-8x7b-shape", "layers": config.num_hidden_layers,
        "batch": batch, "seq": seq, "checkpointing": checkpointing, "dtype": str(dtype).removeprefix("torch."),
        "build_s": round(build_s, 2), "weights_gib": round(weights_gib, 3) if device.type == "cuda" else None, "step_s": round(step_s, 4),
        "tok_per_s": round(batch * seq / step_s, 1), "peak_gib": round(peak_memory_gib(device), 3),
        "matmul_peak_tflops": round(peak_tflops, 1), "hfu": round(achieved / peak_tflops, 4),
        "loss": round(float(loss.detach()), 4),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def result_path(result: dict, out_dir: Path = RESULTS) -> Path:
    device = result["device"].lower().replace(" ", "-")
    return out_dir / f"{result['date']}-{device}-L{result['layers']}-b{result['batch']}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral-ft bench", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny model (CPU smoke mode)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq = min(args.seq, 256)
    for batch in args.batch:
        result = run_benchmark(layers=args.layers, batch=batch, seq=args.seq, steps=args.steps,
                               warmup=args.warmup, device=torch.device(args.device), tiny=args.tiny,
                               checkpointing=not args.no_checkpointing)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = result_path(result, args.out_dir)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)
        print(f"wrote {path}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
