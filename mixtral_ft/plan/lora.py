"""LoRA's memory terms for peak.py: its parameters on every target plan can size, and the inputs it keeps.

peft keeps A and B in fp32 on a 4-bit base; their gradients are fp32; the optimizer keeps states per parameter.
Beyond q/k/v/o_proj (lora.allow_other_targets), plan sizes the router `gate` and the model's two vocabulary
matrices, lm_head and embed_tokens: on Mixtral's 32000-token vocabulary these are the ones that weigh. Any other
target is named by `unsized_targets` so that plan says it left it out.
"""

from __future__ import annotations

from mixtral_ft.plan.inputs import Dims, Run, Step, optimizer_bytes_per_param
from mixtral_ft.recipe import ATTENTION_TARGETS

MODEL_TARGETS = ("gate", "lm_head", "embed_tokens")  # sized beyond the attention projections
VOCABULARY_TARGETS = ("lm_head", "embed_tokens")  # one per model; every other target is one per decoder layer


def target_widths(d: Dims, s: Step) -> dict[str, tuple[int, int]]:
    """target: (how many there are, in + out features): a LoRA of rank r on it has r * (in + out) weights."""
    L, H = d.layers, d.hidden
    return {
        "q_proj": (L, H + s.qw),
        "k_proj": (L, H + s.kvw),
        "v_proj": (L, H + s.kvw),
        "o_proj": (L, s.qw + H),
        "gate": (L, H + d.experts),  # the router: peft wraps its weight (no [tokens, r] activation, measured)
        "lm_head": (1, H + d.vocab),
        "embed_tokens": (1, d.vocab + H),  # lora_embedding_A is [r, vocab], lora_embedding_B [hidden, r]
    }


def unsized_targets(targets: tuple[str, ...]) -> list[str]:
    """The targets plan has no shape for: their LoRA is left out of the estimate."""
    return [t for t in targets if t not in ATTENTION_TARGETS + MODEL_TARGETS]


def lora_notes(targets: tuple[str, ...]) -> list[str]:
    """What plan says about targets beyond the attention: those it leaves out of the estimate.

    lm_head is sized for completeness, though recipes refuse it while TRL's fused LM head bypasses its LoRA."""
    unsized, sized = unsized_targets(targets), ", ".join(ATTENTION_TARGETS + MODEL_TARGETS)
    return [f"LoRA on {', '.join(unsized)} is not counted in this estimate: plan sizes {sized}"] if unsized else []


def lora_params(d: Dims, run: Run, s: Step, *, per_layer: bool = False) -> int:
    """LoRA weights on every sized target, or (per_layer) on the decoder layers' targets only."""
    widths = target_widths(d, s)
    # By name, not by count: in a one-layer model lm_head's count equals the layers'.
    targets = [t for t in run.lora_targets if t in widths and not (per_layer and t in VOCABULARY_TARGETS)]
    return run.lora_r * sum(widths[t][0] * widths[t][1] for t in targets)


def lora_rows(d: Dims, run: Run, s: Step) -> list[tuple[str, int]]:
    lora = lora_params(d, run, s)
    # Grads counted whole: with accumulation they persist between micro-batches (without, they are 0.2% here).
    rows = [
        ("LoRA weights (fp32)", 4 * lora),
        ("LoRA grads (fp32)", 4 * lora),
        (f"optimizer states ({run.optim})", optimizer_bytes_per_param(run.optim) * lora),
    ]
    if s.autocast:  # bf16 copies of the LoRA weights, kept for backward: those of the layers kept whole, or the one
        copies = s.c * lora_params(d, run, s, per_layer=True) * max(s.N, 1) // d.layers  # being recomputed
        rows.append(("LoRA bf16 copies (autocast)", copies))
    if run.num_gpus > 1:  # DDP all-reduces through flat buckets: a second copy of the gradients
        rows.append(("DDP gradient buckets", 4 * lora))
    return rows


def attention_lora_saves(d: Dims, run: Run, s: Step) -> int:
    """What one layer's attention LoRA keeps for backward: its inputs, and lora_A's output (kept by lora_B)."""
    targets = [t for t in run.lora_targets if t in ATTENTION_TARGETS]
    n_qkv = sum(t in targets for t in ATTENTION_TARGETS[:3])
    return (
        lora_inputs(run, s, n_qkv, d.hidden, False)
        + lora_inputs(run, s, int("o_proj" in targets), s.qw, True)
        + len(targets) * s.T * run.lora_r * _lora_bytes(run, s)
    )


def model_lora_saves(d: Dims, run: Run, s: Step) -> tuple[int, int]:
    """(embed_tokens' LoRA saves, alive all step; lm_head's, alive until the LM head's backward).

    embed_tokens keeps lora_A's [tokens, r] output. lm_head keeps its input (the final norm's output, which the
    frozen head itself does not keep) and lora_A's output; its [tokens, vocab] output is added to the logits and
    freed before the loss (measured on tiny: no more at the peak)."""
    a_out = s.T * run.lora_r * _lora_bytes(run, s)
    embed = a_out if "embed_tokens" in run.lora_targets else 0
    head = lora_inputs(run, s, 1, d.hidden, False) + a_out if "lm_head" in run.lora_targets else 0
    return embed, head


def _lora_bytes(run: Run, s: Step) -> int:
    return 4 if _casts(run, s) else s.c


def _casts(run: Run, s: Step) -> bool:
    return s.c < 4 and not s.autocast  # peft casts a bf16 input to its fp32 weights: one copy per projection


def lora_inputs(run: Run, s: Step, n_proj: int, width: int, kept_anyway: bool) -> int:
    """What LoRA keeps of the inputs of n_proj projections `width` wide (kept_anyway: the base layer's save)."""
    if n_proj == 0:
        return 0
    if run.lora_dropout > 0:  # each projection keeps its dropout output and the bool mask
        return n_proj * s.T * width * (_lora_bytes(run, s) + 1)
    return n_proj * s.T * width * 4 if _casts(run, s) else (0 if kept_anyway else s.T * width * s.c)
