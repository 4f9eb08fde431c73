"""Throughput and memory benchmark: full-width Mixtral built straight into NF4, measured beside the peers.

    mixtral-ft bench [--layers 32] [--batch 2 8] [--seq 2048] [--peer-v4-site DIR]   # on a GPU
    mixtral-ft bench --device cpu --tiny                                              # CI smoke run

No 93 GB checkpoint is needed: each weight is drawn on the device and quantized at once, so building
costs one layer of bf16 experts at a time. Then QLoRA steps run through `mixtral_ft.steps`, the harness the
peers (`mixtral_ft.peers`) run through too, and one result file per run is written to
`benchmarks/results/<date>-<device>[-<tag>].json`: tok/s, step time, peak memory and HFU (against a bf16
matmul peak measured in the same run) for each batch, the peers' figures and our speed-up over each.
The speed levers of benchmarks/NOTES.md are options, so each can be measured on its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from mixtral_ft.bench import steps
from mixtral_ft.errors import UserError
from mixtral_ft.model.load import compile_layers
from mixtral_ft.model.loader import build_skeleton, finish_model
from mixtral_ft.model.quant import NF4Experts, configure_experts, quantize_nf4
from mixtral_ft.model.shapes import mixtral_config

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DEFAULT_LEVERS = {"checkpointing": True, "skip_layers": 0, "experts": "grouped", "reuse_dequantized": False,
                  "lora_dropout": 0.0, "liger": False, "compile": False}


def build_random_nf4(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Mixtral with random weights, attention and experts in NF4, built one tensor at a time on `device`."""
    import bitsandbytes as bnb

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


def run_benchmark(*, layers: int, batch: int, seq: int, steps_: int, warmup: int, device: torch.device,
                  tiny: bool, levers: dict | None = None, profile_to: Path | None = None) -> dict:
    from mixtral_ft.model.load import resolve_compute_dtype
    from mixtral_ft.model.shapes import tiny_config

    levers = DEFAULT_LEVERS | (levers or {})
    dtype = resolve_compute_dtype("auto", device)
    config = tiny_config() if tiny else mixtral_config(layers)
    steps.reset_peak(device)
    started = time.perf_counter()
    model = build_random_nf4(config, device, dtype)
    build_s = time.perf_counter() - started
    weights_gib, build_peak = steps.allocated_gib(device), steps.peak_gib(device)
    groups = peers.weight_gib_by_group(model)
    model = apply_levers(model, levers)
    result = steps.time_qlora_steps(model, batch=batch, seq=seq, vocab_size=config.vocab_size, steps=steps_,
                                    warmup=warmup, device=device, profile_to=profile_to)
    del model
    peak_tflops = steps.matmul_peak_tflops(device, dtype)
    recomputed = max(config.num_hidden_layers - levers["skip_layers"], 0) if levers["checkpointing"] else 0
    achieved = step_flops(config, batch * seq, seq, recomputed) / result["step_s"] / 1e12
    return {"model": "tiny" if tiny else "mixtral-8x7b-shape", "layers": config.num_hidden_layers, "batch": batch,
            "seq": seq, "dtype": str(dtype).removeprefix("torch."), "levers": levers, "build_s": round(build_s, 2),
            "build_peak_gib": round(build_peak, 3), "weights_gib": weights_gib and round(weights_gib, 3),
            "weights_gib_by_group": groups,
            **result, "matmul_peak_tflops": round(peak_tflops, 1), "hfu": round(achieved / peak_tflops, 4)}


def run_peers(args, config, batch: int, device: torch.device, dtype: torch.dtype, ours: dict) -> dict:
    """Each peer's figures at this batch, with our speed-up over it (at the v5 peer's reduced depth, ours again)."""
    found = {}
    common = {"batch": batch, "seq": args.seq, "steps_": args.steps, "warmup": args.warmup, "device": device,
              "dtype": dtype}
    if args.peer_v4_site:
        v4 = peers.run_v4(args.peer_v4_site, config, **common)
        if "tok_per_s" in v4:
            v4["our_speedup"] = round(ours["tok_per_s"] / v4["tok_per_s"], 3)
        found["v4"] = v4
    else:
        found["v4"] = {"name": peers.V4_NAME, "skipped": "no --peer-v4-site (a pip --target folder of transformers 4.57)"}
    if args.peer_v5_layers:
        small = _config(args, min(args.peer_v5_layers, config.num_hidden_layers))
        v5 = peers.run_stock_v5(small, full_depth=config.num_hidden_layers, folder=args.v5_checkpoint, **common)
        _free(device)
        ours_small = run_benchmark(layers=small.num_hidden_layers, batch=batch, seq=args.seq, steps_=args.steps,
                                   warmup=args.warmup, device=device, tiny=args.tiny, levers=args.levers)
        v5 |= {"ours_at_same_depth": {k: ours_small[k] for k in ("tok_per_s", "peak_gib", "weights_gib")},
               "our_speedup": round(ours_small["tok_per_s"] / v5["tok_per_s"], 3)}
        found["v5"] = v5
    return found


def result_path(result: dict, out_dir: Path = RESULTS, tag: str | None = None) -> Path:
    device = result["device"].lower().replace(" ", "-")
    return out_dir / f"{result['date']}-{device}{'-' + tag if tag else ''}.json"


def _config(args, layers: int):
    from mixtral_ft.model.shapes import tiny_config

    if args.tiny:
        config = tiny_config()
        config.num_hidden_layers = layers
        return config
    return mixtral_config(layers)


def _free(device: torch.device) -> None:
    # A reference cycle (accelerate's hooks on the stock peer, say) would keep the last model allocated while the
    # next is built, and in its peak: collect before giving the cache back.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="mixtral-ft bench", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny model (CPU smoke mode)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", help="suffix of the result file's name, e.g. the lever measured")
    parser.add_argument("--profile", action="store_true", help="also write each batch's torch.profiler op table")
    peer = parser.add_argument_group("peers (measured in the same run)")
    peer.add_argument("--peer-v4-site", type=Path, metavar="DIR",
                      help="folder holding transformers 4.57 (pip install --no-deps --target DIR transformers==4.57.6 "
                           "huggingface_hub==0.36.2 tokenizers==0.22.1)")
    peer.add_argument("--peer-v5-layers", type=int, default=2, metavar="N",
                      help="depth for stock transformers 5 load_in_4bit, whose experts stay bf16 (0: skip)")
    lever = parser.add_argument_group("speed levers (benchmarks/NOTES.md)")
    lever.add_argument("--no-checkpointing", action="store_true")
    lever.add_argument("--skip-checkpoint-layers", type=int, default=0, metavar="N",
                       help="keep the last N layers' activations instead of recomputing them")
    lever.add_argument("--experts", choices=["grouped", "loop"], default="grouped",
                       help="grouped GEMM (one call per layer) or one matmul per expert")
    lever.add_argument("--reuse-dequantized", action="store_true",
                       help="backward reuses the recompute's dequantized experts (2 dequantizations a step, not 3)")
    lever.add_argument("--lora-dropout", type=float, default=0.0)
    lever.add_argument("--liger", action="store_true", help="liger-kernel RMSNorm, RoPE and fused linear cross-entropy")
    lever.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    args = parser.parse_args(argv)
    for name in ("layers", "batch", "seq", "steps"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.tiny:
        args.seq, args.layers = min(args.seq, 256), 2
    if not 0 <= args.skip_checkpoint_layers <= args.layers:
        raise UserError(f"--skip-checkpoint-layers must be between 0 and --layers ({args.layers})")
    if args.liger and not args.device.startswith("cuda"):
        raise UserError("--liger runs Triton kernels and needs a CUDA GPU: drop --liger on CPU")
    if args.liger and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("--liger needs liger-kernel: pip install liger-kernel")
    if args.peer_v4_site and not (args.peer_v4_site / "transformers").is_dir():
        raise UserError(f"--peer-v4-site {args.peer_v4_site} holds no transformers package: create it with "
                        "pip install --no-deps --target DIR transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.1")
    args.levers = {"checkpointing": not args.no_checkpointing, "skip_layers": args.skip_checkpoint_layers,
                   "experts": args.experts, "reuse_dequantized": args.reuse_dequantized,
                   "lora_dropout": args.lora_dropout, "liger": args.liger, "compile": args.compile}
    return args


def main(argv: list[str] | None = None) -> int:
    import warnings

    from mixtral_ft.model.load import resolve_compute_dtype

    warnings.filterwarnings("ignore", category=FutureWarning)  # upstream deprecations, not the user's to fix
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_compute_dtype("auto", device)
    config = _config(args, args.layers)
    report = {"date": dt.date.today().isoformat(), "device": steps.device_name(device), "versions": _versions(),
              "layers": args.layers, "seq": args.seq, "batch": args.batch, "levers": args.levers,
              "tok_per_s": [], "step_s": [], "peak_gib": [], "hfu": [], "runs": [], "peers": {}}
    path = result_path(report, args.out_dir, args.tag)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mixtral-ft-v5-peer-") as folder:
        args.v5_checkpoint = Path(folder)  # the stock peer's random checkpoint, written once for all batches
        for batch in args.batch:
            run_batch(args, report, batch, device, dtype, config, path)
    print(f"wrote {path}", flush=True)
    return 0


def run_batch(args, report: dict, batch: int, device: torch.device, dtype: torch.dtype, config, path: Path) -> None:
    """Ours at `batch`, then the peers; the result file is rewritten after each batch."""
    profile = path.with_name(f"{path.stem}-b{batch}-profile.txt") if args.profile else None
    ours = run_benchmark(layers=args.layers, batch=batch, seq=args.seq, steps_=args.steps, warmup=args.warmup,
                         device=device, tiny=args.tiny, levers=args.levers, profile_to=profile)
    _free(device)
    for key in ("tok_per_s", "step_s", "peak_gib", "hfu"):
        report[key].append(ours[key])
    report["runs"].append(ours)
    for name, figures in run_peers(args, config, batch, device, dtype, ours).items():
        report["peers"].setdefault(name, []).append(figures)
    _free(device)
    print(summary(ours, report["peers"]), flush=True)
    path.write_text(json.dumps(report, indent=2) + "\n")  # after every batch: a later OOM keeps the earlier ones


def summary(ours: dict, found: dict) -> str:
    line = (f"B{ours['batch']} x S{ours['seq']}, {ours['layers']} layers: {ours['tok_per_s']:,.0f} tok/s, "
            f"peak {ours['peak_gib']:.2f} GiB, HFU {ours['hfu']:.1%}")
    for figures in (history[-1] for history in found.values()):
        if "our_speedup" in figures:
            line += (f" | {figures['name']} at {figures['layers']} layers: {figures['tok_per_s']:,.0f} tok/s, "
                     f"peak {figures['peak_gib']:.2f} GiB, ours {figures['our_speedup']:.2f}x")
        else:
            line += f" | {figures['name']}: {figures.get('error') or figures.get('skipped')}"
    return line
