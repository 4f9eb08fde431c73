"""What peak.py's estimate takes: the model's shape (`Dims`), the run's settings (`Run`), and their shorthands.

Also the sizes that do not depend on the moment: an NF4 weight's bytes, an optimizer's bytes per parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import ATTENTION_TARGETS


def nf4_bytes(n: int) -> int:
    """A Params4bit of n weights: 4-bit codes, uint8 absmax per 64, fp32 absmax per 256 of those, tables."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 64 + 1024  # offset, NF4 + nested maps


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> Dims:
        """From a config.json dict or a transformers MixtralConfig."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        if get("model_type", "mixtral") != "mixtral":
            raise UserError(f"the model is a {get('model_type')} model: mixtral_ft fine-tunes Mixtral only")
        shape = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
        shape += ("num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size")
        missing = [k for k in shape if not isinstance(get(k), int) or get(k) < 1]
        if missing:  # a hand-written or truncated config.json: the estimate has nothing to go on
            raise UserError(
                f"the model's config.json lacks {', '.join(missing)}: point model.name at a complete Mixtral checkpoint"
            )
        h, heads = get("hidden_size"), get("num_attention_heads")
        return cls(
            get("num_hidden_layers"),
            h,
            get("intermediate_size"),
            heads,
            get("num_key_value_heads"),
            get("head_dim") or h // heads,
            get("num_local_experts"),
            get("num_experts_per_tok"),
            get("vocab_size"),
            bool(get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class Run:
    batch: int  # examples per micro-batch on one GPU
    seq: int  # tokens per sequence (the worst case: every row max_length long)
    rows: int = 1  # sequences per example: 2 for DPO (chosen and rejected go through together)
    dtype_bytes: int = 2  # compute dtype: 2 for bf16/fp16, 4 for fp32
    checkpointing: bool = True
    skip_layers: int = 0  # train.skip_checkpoint_layers: the last N layers keep their activations (no recompute)
    reuse_dequantized: bool = False  # a recomputed layer's dequantized experts are kept for its backward
    quantize_experts: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ATTENTION_TARGETS
    lora_dropout: float = 0.0
    optim: str = "adamw_torch"
    loop: str = "trainer"  # trainer: TRL (autocast, fused LM head on a GPU); plain: bench/throughput.py's loop
    triton: bool = True  # TRL's fused head runs Triton kernels (GPU); else its torch fallback (CPU)
    padded: bool = True  # batches carry an attention mask (not packed): sdpa repeats k/v per head
    num_gpus: int = 1


def optimizer_bytes_per_param(optim: str) -> int:
    """Adam: two fp32 states; Lion: one; 8-bit: uint8 states (absmax per 256 is < 2%); SGD, Adafactor: ~none."""
    name = optim.lower()
    if "sgd" in name or "adafactor" in name:  # no momentum by default / factored second moments
        return 0
    return (1 if "lion" in name else 2) * (1 if "8bit" in name else 4)


@dataclass(frozen=True)
class Step:
    """One micro-batch's shorthands, shared by every term: tokens, projection widths, layers kept whole."""

    c: int  # bytes of the compute dtype
    B: int  # sequences per micro-batch
    T: int  # tokens
    Tk: int  # (token, expert) pairs
    qw: int  # width of q (and of o_proj's input)
    kvw: int  # width of k and v
    N: int  # layers that keep their activations (not recomputed)
    autocast: bool  # the HF Trainer runs bf16/fp16 under torch.autocast

    @classmethod
    def of(cls, d: Dims, run: Run) -> Step:
        B = run.batch * run.rows
        T = B * run.seq
        N = min(run.skip_layers, d.layers) if run.checkpointing else d.layers
        autocast = run.loop == "trainer" and run.dtype_bytes < 4
        qw, kvw = d.heads * d.head_dim, d.kv_heads * d.head_dim
        return cls(run.dtype_bytes, B, T, T * d.top_k, qw, kvw, N, autocast)


def dtype_name(c: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(c, f"{c}-byte")
