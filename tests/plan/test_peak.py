"""peak.py's estimate, number by number: pinned outputs (so a refactor is proven byte-identical) and LoRA targets."""

from pathlib import Path

import pytest

from mixtral_ft.model.shapes import mixtral_config, tiny_config
from mixtral_ft.plan.peak import Dims, Run, estimate

BIG, TINY = Dims.of(mixtral_config(32)), Dims.of(tiny_config())

# Bytes as estimate gave them before it was split into one function per term group (2026-12): every branch
# (checkpointing on/off, skip/reuse levers, dropout, DDP, bf16 experts, DPO rows, plain loop, fp32, fewer targets).
PINNED = {
    "oasst": (BIG, Run(2, 2048, optim="paged_adamw_8bit"), 28674200320, 19035245568, "recompute through gate_up"),
    "no checkpointing, dropout": (
        BIG,
        Run(1, 1024, checkpointing=False, lora_dropout=0.05),
        37081469696,
        68886377984,
        "forward through gate_up",
    ),
    "skip, reuse, DDP": (
        BIG,
        Run(2, 2048, skip_layers=2, reuse_dequantized=True, num_gpus=4),
        30250013440,
        49303636992,
        "layer 30 (last recomputed), recompute through down_proj",
    ),
    "bf16 experts, DPO": (
        BIG,
        Run(1, 1024, rows=2, quantize_experts=False, triton=False, padded=False),
        94283062272,
        8383740416,
        "fused LM head backward",
    ),
    "tiny plain fp32": (TINY, Run(2, 128, dtype_bytes=4, loop="plain", padded=False), 115245568, 107923456, "loss"),
    "tiny plain bf16 q,v": (
        TINY,
        Run(2, 128, loop="plain", lora_targets=("q_proj", "v_proj")),
        106871680,
        104515584,
        "loss backward",
    ),
}


@pytest.mark.parametrize("case", PINNED)
def test_estimate_numbers_are_pinned(case):
    dims, run, peak, phases, moment = PINNED[case]
    est = estimate(dims, run)
    assert (est.peak, sum(est.phases.values())) == (peak, phases) and moment in est.moment


def test_oasst_rows_are_pinned():
    est = estimate(BIG, Run(2, 2048, optim="paged_adamw_8bit"))
    assert est.rows == [
        ("embeddings", 262144000),
        ("attention (NF4)", 692527616),
        ("router", 2097152),
        ("experts (NF4)", 23264301312),
        ("norms", 532480),
        ("lm_head", 262144000),
        ("LoRA weights (fp32)", 54525952),
        ("LoRA grads (fp32)", 54525952),
        ("optimizer states (paged_adamw_8bit)", 27262976),
        ("LoRA bf16 copies (autocast)", 851968),
        ("checkpointed inputs, 32 layers", 1073741824),
        ("this layer's saved activations", 303579136),
        ("MoE activations + gradients", 738197504),
        ("dequant workspace (gate_up_proj, bf16)", 1937768448),
    ]
    assert est.weights == 24483746560


def test_lm_head_and_embed_tokens_add_their_terms_on_mixtral():
    """SFT on Mixtral (bf16, autocast): r * (H + V) parameters each, 4 + 4 + 2 bytes (paged 8-bit Adam) apiece."""
    run = Run(2, 2048, optim="paged_adamw_8bit")
    both = Run(2, 2048, optim="paged_adamw_8bit", lora_targets=run.lora_targets + ("lm_head", "embed_tokens"))
    added = estimate(BIG, both).peak - estimate(BIG, run).peak
    assert added == 2 * 16 * (4096 + 32000) * (4 + 4 + 2) + 4096 * 16 * 2  # + embed_tokens' lora_A output (bf16)


def test_a_target_plan_cannot_size_is_named_not_priced(capsys):
    from mixtral_ft.cli import main

    run = Run(2, 2048, lora_targets=("q_proj", "v_proj", "w1"))
    assert estimate(BIG, run).rows == estimate(BIG, Run(2, 2048, lora_targets=("q_proj", "v_proj"))).rows
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")
    others = ["lora.allow_other_targets=true", "lora.target_modules=[q_proj,w1,w3,embed_tokens]"]
    main(["plan", recipe, "model.quantize_experts=false", *others])  # LoRA on the experts needs them in bf16
    notes = [line for line in capsys.readouterr().out.splitlines() if "LoRA on" in line]
    assert len(notes) == 1 and "LoRA on w1, w3 is not counted" in notes[0], notes


@pytest.mark.parametrize("layers", [1, 2])
def test_model_targets_add_no_per_layer_bf16_copies_at_any_depth(layers):
    """Autocast's bf16 copies are those of the decoder layers' LoRA; lm_head and embed_tokens, one each per model,
    are not among them, even in a model one layer deep (where "one per model" and "one per layer" coincide)."""
    dims = Dims.of(tiny_config(num_hidden_layers=layers))
    run = Run(2, 128)
    both = Run(2, 128, lora_targets=run.lora_targets + ("lm_head", "embed_tokens"))
    copies = [dict(estimate(dims, r).rows)["LoRA bf16 copies (autocast)"] for r in (run, both)]
    assert copies[0] == copies[1]
