"""CUDA correctness checks of our NF4 experts, run first in a GPU session (benchmarks/gpu_truth.py, stage `checks`).

    python benchmarks/cuda_checks.py --out checks.json            # on a GPU: bf16, Mixtral's expert shapes
    python benchmarks/cuda_checks.py --device cpu --small --out F  # dry run of the same code on CPU

1. The expert compute path the product chose on this device (the grouped-GEMM probe in `model/grouped_gemm.py`).
2. `F.grouped_mm` (raw) and the product's chosen path against an fp32 per-expert loop on the exact operands
   we pass: the forward's transposed, non-contiguous view of the dequantized [E, out, in] weight, the same
   made contiguous, and the backward's contiguous weight (pytorch#186365: some builds miscompute a transposed
   bf16 view), at Mixtral's shapes. The raw figures say whether the probe's choice was needed.
3. Our NF4 model against transformers' own Mixtral holding the dequantized weights (fp32): logits, loss and
   every LoRA gradient, once per expert path (grouped, loop, reuse of the recompute's dequantization) with
   non-reentrant checkpointing on, as training runs it.

Every figure goes into --out the moment it exists; the process exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mixtral_ft.bench import steps
from mixtral_ft.bench.throughput import build_random_nf4
from mixtral_ft.model import grouped_gemm, quant
from mixtral_ft.model.audit import dequantized_reference
from mixtral_ft.model.shapes import mixtral_config, tiny_config

# bf16 against an fp32 reference: a correct kernel lands near 4e-3 (bf16's rounding); a layout bug near 1.
GEMM_TOLERANCE = 2e-2


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12)).item()


def expert_counts(rows: int, experts: int, generator: torch.Generator) -> list[int]:
    """Uneven rows per expert, one expert empty, as real routing gives."""
    shares = torch.rand(experts, generator=generator)
    shares[experts // 2] = 0
    counts = (shares / shares.sum() * rows).long()
    counts[0] += rows - counts.sum()
    return counts.tolist()


def gemm_layouts(device: torch.device, dtype: torch.dtype, hidden: int, inter: int, rows: int) -> dict:
    """Error of each way we call the grouped GEMM, against the fp32 per-expert loop."""
    generator = torch.Generator().manual_seed(0)
    counts = expert_counts(rows, 8, generator)
    counts_t = torch.tensor(counts, device=device)
    found = {"counts": counts, "tolerance": GEMM_TOLERANCE}
    for name, out_dim, in_dim in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
        dense = (torch.randn(8, out_dim, in_dim, generator=generator) * 0.02).to(device, dtype)
        x = torch.randn(rows, in_dim, generator=generator).to(device, dtype)
        grad = torch.randn(rows, out_dim, generator=generator).to(device, dtype)
        operands = {  # (input, weight [E, K, N]) exactly as _NF4GroupedLinear passes them
            "forward_transposed_view": (x, dense.transpose(1, 2)),
            "forward_contiguous": (x, dense.transpose(1, 2).contiguous()),
            "backward_contiguous": (grad, dense),
        }
        for layout, (inp, weight_t) in operands.items():
            reference = grouped_gemm.expert_matmul(inp.float(), weight_t.float(), counts_t, "loop")  # fp32 truth
            for path, mode in (("product", None), ("loop", "loop")):  # product: the mode the probe chose
                ours = grouped_gemm.expert_matmul(inp, weight_t, counts_t, mode)
                found[f"{name}.{layout}.{path}"] = round(rel_error(ours, reference), 6)
            if hasattr(torch.nn.functional, "grouped_mm"):  # the raw kernel, whatever the product decided
                offsets = torch.cumsum(counts_t, 0, dtype=torch.int32)
                raw = torch.nn.functional.grouped_mm(inp, weight_t, offs=offsets)
                found[f"{name}.{layout}.raw_grouped_mm"] = round(rel_error(raw, reference), 6)
        del dense, x, grad
    found["ok"] = all(v <= GEMM_TOLERANCE for k, v in found.items() if k.endswith((".product", ".loop")))
    return found


def randomize_lora(model, seed: int) -> None:
    """Non-zero LoRA A and B (B starts at zero), the same values for any model with the same adapter names."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, float, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n.split("model.", 1)[-1]: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), out.loss.item(), grads


def lora_reference(model, dtype: torch.dtype, ids: torch.Tensor):
    reference = steps.add_lora(dequantized_reference(model, dtype))
    randomize_lora(reference, seed=1)
    return loss_and_grads(reference, ids)


def distance(figures, truth) -> dict:
    """How far (logits, loss, LoRA gradients) lie from the fp32 reference's."""
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = figures, truth
    cosines = {
        n: torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[n].flatten(), 0).item()
        for n, g in grads.items()
    }
    worst = min(cosines, key=cosines.get)
    return {
        "logits_rel_error": round(rel_error(logits, ref_logits), 6),
        "loss_error": round(abs(loss - ref_loss), 6),
        "lora_grad_min_cosine": round(cosines[worst], 6),
        "worst_grad": worst,
        "lora_grads_compared": len(cosines) if set(cosines) == set(ref_grads) else -1,
    }


def model_against_reference(device: torch.device, dtype: torch.dtype, small: bool) -> dict:
    """Logits, loss and LoRA gradients of our NF4 model against transformers' on the same dequantized weights.

    The truth is transformers in fp32; transformers' own run in `dtype` gives the rounding noise a correct
    implementation in that dtype shows. Ours passes within twice that noise (a layout bug is off by ~100%).
    """
    config = (
        tiny_config() if small else mixtral_config(2, hidden_size=1024, intermediate_size=3584, num_attention_heads=8)
    )
    model = build_random_nf4(config, device, dtype)
    ids = torch.randint(3, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(2)).to(device)
    truth = lora_reference(model, torch.float32, ids)
    noise = distance(lora_reference(model, dtype, ids), truth)
    found = {"shape": {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")}}
    found["transformers_" + str(dtype).removeprefix("torch.")] = noise

    steps.enable_checkpointing(model)
    model = steps.add_lora(model)
    randomize_lora(model, seed=1)
    for path, levers in (("grouped", {}), ("loop", {"grouped_mm": False}), ("reuse", {"reuse_dequantized": True})):
        quant.configure_experts(model.get_base_model(), **levers)
        found[path] = distance(loss_and_grads(model, ids), truth)
        found[path]["ok"] = (
            found[path]["logits_rel_error"] <= 2 * noise["logits_rel_error"] + 1e-3
            and found[path]["lora_grad_min_cosine"] >= 1 - 2 * (1 - noise["lora_grad_min_cosine"]) - 1e-3
            and found[path]["lora_grads_compared"] > 0
        )
    quant.configure_experts(model.get_base_model())
    found["ok"] = all(found[p]["ok"] for p in ("grouped", "loop", "reuse"))
    return found


def compute_mode(device: torch.device, dtype: torch.dtype) -> dict:
    """The product's decision (model/grouped_gemm.py's probe, cached per device type and dtype) and what it cost."""
    started = time.perf_counter()
    mode = grouped_gemm.expert_compute_mode(device, dtype)
    return {"mode": mode, "probe_s": round(time.perf_counter() - started, 4), "ok": mode in grouped_gemm.EXPERT_MODES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small shapes (CPU dry run)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    report = {"device": steps.device_name(device), "dtype": "bfloat16", "torch": torch.__version__}
    checks = (
        ("expert_compute", lambda: compute_mode(device, dtype)),
        (
            "grouped_gemm_layouts",
            lambda: gemm_layouts(device, dtype, *((256, 512, 512) if args.small else (4096, 14336, 8192))),
        ),
        ("model_against_reference", lambda: model_against_reference(device, dtype, args.small)),
    )
    for name, check in checks:
        started = time.perf_counter()
        try:
            report[name] = check()
        except Exception as exc:  # a broken path is a finding: record it and go on to the next check
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        report[name]["seconds"] = round(time.perf_counter() - started, 2)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{name}: {json.dumps(report[name])[:600]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [name for name, _ in checks if report[name].get("ok") is False]
    print(f"checks {'failed: ' + ', '.join(failed) if failed else 'passed'}; wrote {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
