"""`mixtral-ft merge --verify`: does the merged folder compute what the adapter on its base computed?

The merged model is loaded the way users will load it (plain transformers), the reference with peft's adapter
on the base the merge folded it into: for the default merge, the NF4 base training ran (`load_model`); for
`--base-weights original`, the checkpoint's own weights (plain transformers). Both score the same held-out rows:
logit differences and the perplexity of the assistant tokens go to verify.json and the model card, with a verdict.

Both sides compute in fp32 whatever dtype the merge wrote, so the check measures the merge, not the compute
dtype: the merged weights are base + scale·B·A, so with fp32 weights only summation order differs (mean
|Δlogit| ~2e-6 of mean |logit|), and with bf16/fp16 weights their rounding (bf16 moves each weight by up to
2^-9: ~1-2% of mean |logit| on the tiny model; an original-weights merge held to the NF4 reference would be
~60% off, hence its own reference). The verdict is `ok` when mean |Δlogit| <= REL_TOL[dtype] x mean |logit|.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixtral_ft.errors import UserError

REL_TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}  # of mean |logit|, on mean |Δlogit|
# Per element of an adapted weight, of |expected|: twice the dtype's unit roundoff (bf16 2^-8, fp16 2^-11).
WEIGHT_REL_TOL = {"float32": 1e-6, "float16": 2**-10, "bfloat16": 2**-7}
BUILTIN_CONVERSATIONS = [  # (user, assistant): used when the adapter folder has no recipe to take data from
    ("What is the capital of France?", "The capital of France is Paris."),
    (
        "Write a haiku about autumn.",
        "Red leaves drift and fall,\ncold wind hums through empty trees,\nthe year exhales.",
    ),
    ("Explain recursion in one sentence.", "A function solves a problem by calling itself on smaller parts of it."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]
REFERENCES = {  # per merge mode (`--base-weights`): what the merged folder is held to
    "dequantized": "adapter on the NF4 base, as trained",
    "original": "adapter on the checkpoint's original weights",
}


def verify_merge(
    merged: Path,
    adapter: Path,
    base: Path,
    *,
    quantize_experts: bool = True,
    device: str | None = None,
    samples: int = 8,
    max_length: int = 256,
    weights_dtype: str = "bfloat16",
    base_weights: str = "dequantized",
) -> dict:
    """Merged model (plain transformers) vs the adapter (peft) on the base it was merged into, on held-out rows.

    `weights_dtype` is what the merge wrote (its rounding sets the tolerance; "mixed": bf16's); `base_weights`
    the merge's mode: "dequantized" (reference: NF4 base, as trained) or "original" (the checkpoint's weights).
    """
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.model.device import check_device

    device = check_device(device)
    dtype = torch.float32  # both sides, on any device: an accuracy check, where bf16 noise would hide errors
    rows, source = _held_out(adapter, load_tokenizer(adapter, mode="finetuning"), samples, max_length)
    reference_model = (
        _plain_model(base, device, dtype)
        if base_weights == "original"
        else _nf4_model(base, quantize_experts, device, dtype)
    )
    reference, weights = _adapter_on(reference_model, adapter, merged, rows, device)
    del reference_model  # before the merged model loads: full Mixtral in fp32 is ~190 GB
    got = _logits(_plain_model(merged, device, dtype), rows, device)
    report = {
        "reference": REFERENCES[base_weights],
        "samples": len(rows),
        "source": source,
        "tokens": sum(len(ids) for ids, _ in rows),
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        **_compare(reference, got, rows),
        **weights,
    }
    report.update(_verdict(report, weights_dtype))
    _print_report(report, weights_dtype)
    return report


def _nf4_model(base: Path, quantize_experts: bool, device: torch.device, dtype: torch.dtype):
    """The base as training ran it: `load_model` (NF4)."""
    from mixtral_ft.model.load import load_model

    return load_model(str(base), quantize_experts=quantize_experts, device=device, compute_dtype=dtype)


def _plain_model(folder: Path, device: torch.device, dtype: torch.dtype):
    """A checkpoint loaded the way users will load it: plain transformers."""
    from transformers import AutoModelForCausalLM

    # fp32 Mixtral (~190 GB) exceeds one GPU: device_map="auto" offloads what does not fit to host memory.
    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, device_map="auto" if device.type == "cuda" else None
    )


def _adapter_on(base_model, adapter: Path, merged: Path, rows: list, device: torch.device) -> tuple[list, dict]:
    """The reference, the adapter (peft) on `base_model`: its logits, and the merged folder's adapted weights
    checked against its own."""
    from mixtral_ft.model.load import load_adapter

    peft_model = load_adapter(base_model, adapter)
    return _logits(peft_model, rows, device), _check_adapted_weights(peft_model, merged)


@torch.no_grad()
def _check_adapted_weights(peft_model, merged: Path) -> dict:
    """Each adapted weight as written vs peft's base weight (dequantized, when NF4) + scale·B·A, one at a time."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight
    from safetensors import safe_open

    from mixtral_ft.model.loader import LEGACY_ROUTER, checkpoint_shards

    expected = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    checked, off, worst = 0, [], 0.0
    for shard in checkpoint_shards(merged):
        with safe_open(str(shard), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                module = expected.pop(LEGACY_ROUTER.sub(r"\1.mlp.gate.weight", key), None)
                if module is None:
                    continue
                got = reader.get_tensor(key)
                want = dequantize_module_weight(module.get_base_layer()).float() + module.get_delta_weight("default")
                want = want.float().cpu()
                bound = WEIGHT_REL_TOL[str(got.dtype).removeprefix("torch.")] * want.abs() + 1e-6 * want.abs().max()
                ratio = ((got.float() - want).abs() / bound).max().item()
                checked, worst = checked + 1, max(worst, ratio)
                off += [key] if not ratio <= 1 else []  # NaN: off
    return {
        "adapted_weights": checked + len(expected),
        "adapted_weights_off": off + sorted(expected),  # beyond the bound, or absent from the folder
        "adapted_weight_error_ratio": worst,
    }


def _compare(reference: list[torch.Tensor], got: list[torch.Tensor], rows: list) -> dict:
    """Logit differences (merged vs reference) and both perplexities."""
    diffs = [(a - b).abs() for a, b in zip(reference, got)]
    return {
        "max_abs_logit_diff": max(d.max().item() for d in diffs),
        "mean_abs_logit_diff": sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs),
        "mean_abs_logit": sum(r.abs().sum().item() for r in reference) / sum(r.numel() for r in reference),
        "perplexity_adapter_on_base": _perplexity(reference, rows),
        "perplexity_merged": _perplexity(got, rows),
    }


def _print_report(report: dict, weights_dtype: str) -> None:
    """Four `verify:` lines: what was scored, the logit gap, the perplexities, the verdict."""
    print(
        f"verify: {report['samples']} samples ({report['source']}), {report['tokens']} tokens, "
        f"{report['compute_dtype']}; reference: {report['reference']}"
    )
    print(
        f"verify: logits |merged - adapter-on-base|: max {report['max_abs_logit_diff']:.3g}, "
        f"mean {report['mean_abs_logit_diff']:.3g} (mean |logit| {report['mean_abs_logit']:.3g})"
    )
    print(
        f"verify: perplexity (assistant tokens): adapter-on-base {report['perplexity_adapter_on_base']:.4f}, "
        f"merged {report['perplexity_merged']:.4f}"
    )
    off, total = report["adapted_weights_off"], report["adapted_weights"]
    print(
        f"verify: adapted weights vs the reference's W + scale·B·A: {total - len(off)} of {total} within "
        f"their dtype's rounding (worst {report['adapted_weight_error_ratio']:.3g}x the bound)"
        + (f"; off: {', '.join(off[:3])}{' ...' if len(off) > 3 else ''}" if off else "")
    )
    print(
        f"verify: {report['verdict']}: mean |Δlogit| {report['mean_abs_logit_diff']:.3g} "
        f"{'<=' if report['mean_abs_logit_diff'] <= report['tolerance'] else '>'} tolerance {report['tolerance']:.3g} "
        f"({report['relative_tolerance']:g} x mean |logit|, for {weights_dtype} weights)"
        + (f", {len(off)} adapted weights off" if off else "")
    )


def _verdict(report: dict, weights_dtype: str) -> dict:
    """`ok` when the mean logit difference is within what the written dtype's rounding explains, and so is every
    element of every adapted weight."""
    rel = REL_TOL.get(weights_dtype, REL_TOL["bfloat16"])
    tolerance = rel * report["mean_abs_logit"]
    diff = report["mean_abs_logit_diff"]
    ok = diff <= tolerance and not report["adapted_weights_off"]  # NaN compares False: fails
    return {
        "weights_dtype": weights_dtype,
        "relative_tolerance": rel,
        "tolerance": tolerance,
        "verdict": "ok" if ok else "FAILED",
    }


def _held_out(adapter: Path, tokenizer, samples: int, max_length: int) -> tuple[list, str]:
    """The recipe's eval rows (same split and seed as training), else its first rows, else built-ins."""
    from mixtral_ft.data.conversations import encode_conversation

    if (adapter / "recipe.yaml").exists():
        from mixtral_ft.data.conversations import load_sft_data
        from mixtral_ft.recipe import load_recipe

        try:
            recipe = load_recipe(adapter / "recipe.yaml")
            data = load_sft_data(recipe.data, tokenizer, max_length=max_length, seed=recipe.train.seed)
        except UserError as exc:  # e.g. a relative data path from another working directory
            print(f"verify: recipe data unavailable ({exc}); using built-in conversations")
        else:
            split, what = (
                (data.eval, "eval split") if data.eval is not None else (data.train, "train rows, no eval split")
            )
            rows = split.select(range(min(samples, len(split))))
            return [(r["input_ids"], r["assistant_masks"]) for r in rows], f"{recipe.data.path} {what}"
    rows = [
        encode_conversation([{"role": "user", "content": u}, {"role": "assistant", "content": a}], tokenizer)
        for u, a in BUILTIN_CONVERSATIONS[:samples]
    ]
    return [(r["input_ids"], r["assistant_masks"]) for r in rows], "built-in conversations"


@torch.no_grad()
def _logits(model, rows: list, device: torch.device) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids, _ in rows]


def _perplexity(logits: list[torch.Tensor], rows: list) -> float:
    """exp(mean NLL) over the assistant tokens, the tokens training put its loss on."""
    from mixtral_ft.model.scoring import assistant_nll

    scored = [assistant_nll(out, ids, mask) for out, (ids, mask) in zip(logits, rows)]
    nll, count = sum(n for n, _ in scored), sum(c for _, c in scored)
    return float(torch.exp(torch.tensor(nll / max(count, 1))))
