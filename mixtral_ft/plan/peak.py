"""The peak-memory model behind `mixtral-ft plan`: bytes per GPU alive at a training step's peak.

The estimate accounts for the tensors alive at the step's peak, term by term: the weights by group, LoRA
weights, gradients and optimizer states, the activations kept for backward, and the working set of the
moment the step peaks: the loss over the logits, or one layer's recompute and backward, where an expert
weight is dequantized whole (quant._NF4GroupedLinear). That is what `torch.cuda.max_memory_allocated`
reports. It needs only the model's shape (`Dims`) and the run's settings (`Run`); preflight.py reads those
from a recipe and turns the estimate into a verdict and advice.
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


@dataclass
class Estimate:
    rows: list[tuple[str, int]]  # components alive at the peak; they sum to `peak`
    moment: str  # when the step peaks
    phases: dict[str, int]  # activation peak of each candidate moment (for the JSON and the notes)
    weights: int

    @property
    def peak(self) -> int:
        return sum(b for _, b in self.rows)


def optimizer_bytes_per_param(optim: str) -> int:
    """Adam: two fp32 states; Lion: one; 8-bit: uint8 states (absmax per 256 is < 2%); SGD, Adafactor: ~none."""
    name = optim.lower()
    if "sgd" in name or "adafactor" in name:  # no momentum by default / factored second moments
        return 0
    return (1 if "lion" in name else 2) * (1 if "8bit" in name else 4)


def estimate(d: Dims, run: Run) -> Estimate:
    c, L, H, F, E, k, V = run.dtype_bytes, d.layers, d.hidden, d.inter, d.experts, d.top_k, d.vocab
    B, S = run.batch * run.rows, run.seq
    N = min(run.skip_layers, L) if run.checkpointing else L  # layers that keep their activations (not recomputed)
    T, Tk, qw, kvw = B * S, B * S * k, d.heads * d.head_dim, d.kv_heads * d.head_dim

    # --- weights: embeddings and lm_head, norms and router in the compute dtype; attention (and experts) NF4
    experts = (nf4_bytes(E * 2 * F * H) + nf4_bytes(E * H * F)) if run.quantize_experts else 3 * E * F * H * c
    attention = L * sum(map(nf4_bytes, (qw * H, kvw * H, kvw * H, H * qw)))
    weights = [
        ("embeddings", V * H * c),
        ("attention (NF4)", attention),
        ("router", L * E * H * c),
        ("experts (NF4)" if run.quantize_experts else f"experts ({dtype_name(c)})", L * experts),
        ("norms", (2 * L + 1) * H * c),
        ("lm_head", 0 if d.tied else V * H * c),
    ]
    # --- LoRA: peft keeps A and B in fp32 on a 4-bit base; grads fp32; optimizer states per parameter
    shapes = {"q_proj": (H, qw), "k_proj": (H, kvw), "v_proj": (H, kvw), "o_proj": (qw, H)}
    lora = L * run.lora_r * sum(sum(shapes[t]) for t in run.lora_targets if t in shapes)
    autocast = run.loop == "trainer" and c < 4  # the HF Trainer runs bf16/fp16 under torch.autocast
    # Grads counted whole: with accumulation they persist between micro-batches (without, they are 0.2% here).
    rows = weights + [
        ("LoRA weights (fp32)", 4 * lora),
        ("LoRA grads (fp32)", 4 * lora),
        (f"optimizer states ({run.optim})", optimizer_bytes_per_param(run.optim) * lora),
    ]
    if autocast:  # bf16 copies of the LoRA weights, kept for backward: those of the layers kept whole, or the one
        rows.append(("LoRA bf16 copies (autocast)", c * lora * max(N, 1) // L))  # being recomputed
    if run.num_gpus > 1:  # DDP all-reduces through flat buckets: a second copy of the gradients
        rows.append(("DDP gradient buckets", 4 * lora))

    # --- activations kept for backward by one decoder layer (steady state)
    norm = T * H * 4 + T * 4  # RMSNorm keeps its fp32 input (a copy under bf16) and 1/rms
    norm1 = T * 4 if c == 4 else norm  # fp32, recomputed layers: that input *is* the checkpointed one
    cast = c < 4 and not autocast  # peft casts a bf16 input to its fp32 weights: one copy per projection
    lb = 4 if cast else c

    def lora_inputs(n_proj: int, width: int, kept_anyway: bool) -> int:
        if n_proj == 0:
            return 0
        if run.lora_dropout > 0:  # each projection keeps its dropout output and the bool mask
            return n_proj * T * width * (lb + 1)
        return n_proj * T * width * 4 if cast else (0 if kept_anyway else T * width * c)

    n_qkv = sum(t in run.lora_targets for t in ATTENTION_TARGETS[:3])
    kv_kept = qw if run.padded else kvw  # with a mask, transformers' sdpa passes repeat_kv copies of k and v
    attn = (
        norm1
        + lora_inputs(n_qkv, H, False)
        + lora_inputs(int("o_proj" in run.lora_targets), qw, True)
        + len(run.lora_targets) * T * run.lora_r * lb  # lora_A's output, kept by lora_B
        + 2 * T * qw * c
        + 2 * T * kv_kept * c
        + B * d.heads * S * 4
    )  # sdpa: q, k, v, output, logsumexp
    router = T * E * 4 + T * k * (8 + 4 + 4) + T * 4  # fp32 softmax, top-k indices and weights, their sum
    index = Tk * (3 * 8 + 4)  # sort order, its row index, the inverse permutation; routing weights in order
    gate_up, act, down32 = Tk * 2 * F * c, Tk * F * c, Tk * H * 4  # gate_up out; silu(gate); fp32 down out
    layer = attn + norm + router + index + gate_up + act + down32
    common = attn + norm + router + index  # what is still kept when the layer's experts run or backprop
    whole = layer - norm1 + norm  # a layer kept whole: its first norm keeps its own fp32 input copy

    # --- one layer's MoE: the moments where a whole dequantized expert weight meets the big activations
    w_gu = E * 2 * F * H * (c * 16 + 1) // 16 if run.quantize_experts else 0  # + the fp32 absmax (4 B per 64)
    w_dn = E * H * F * (c * 16 + 1) // 16 if run.quantize_experts else 0
    n2, by_expert, grad = T * H * c, Tk * H * c, T * H * c  # router input, rows sorted by expert, residual grad

    def moments(recompute: bool) -> dict[str, tuple[int, int]]:
        """moment: (dequantized weight, everything else of this MoE); silu(gate) and its product are `act`s.

        Checkpointing recomputes a layer when backward first needs it: the gradient arriving then is the
        residual's plus the fp32 [tokens*top_k, H] copy that un-summing the experts' outputs makes. With reuse,
        the recompute's gate_up_proj weight stays until its backward, beside down_proj's."""
        in_flight, how = (grad + Tk * H * 4, "recompute") if recompute else (0, "forward")
        held = w_gu if recompute and run.reuse_dequantized else 0
        return {
            f"{how} through gate_up_proj": (w_gu, in_flight + n2 + by_expert + gate_up),
            f"{how} through down_proj": (w_dn + held, in_flight + n2 + by_expert + gate_up + 2 * act + Tk * H * c),
            "backward through down_proj": (w_dn + held, grad + gate_up + 2 * act + Tk * H * c),
            "backward through silu(gate) * up": (held, grad + gate_up + 3 * act),  # gate_up, d(act), d(up), d(gate)
            "backward through gate_up_proj": (w_gu, grad + gate_up + by_expert),  # d(gate_up), d(rows)
        }

    # The last layer if it is kept whole (every earlier one's saves alive), and the last recomputed layer (the
    # whole layers' saves already freed by their backward): each layer's inputs are kept by checkpointing.
    inputs = (L - N) * T * H * c
    candidates = {}  # where: (earlier layers kept whole, their saves + all inputs, this layer's saves, MoE moments)
    if N:
        candidates["last layer"] = (N - 1, inputs + (N - 1) * whole, common - norm1 + norm, moments(False))
    if N < L:
        recomputed = "last layer" if N == 0 else f"layer {L - N} (last recomputed)"
        candidates[recomputed] = (0, inputs, common, moments(True))
    moe = {
        f"{where}, {m}": (n, kept, own, b) for where, (n, kept, own, ms) in candidates.items() for m, b in ms.items()
    }
    phases = {m: kept + own + sum(b) for m, (_, kept, own, b) in moe.items()}

    # --- the loss, after the final norm (which keeps its fp32 input too)
    before_loss = inputs + N * whole + norm
    if run.loop == "plain":  # transformers' ForCausalLMLoss: fp32 log_softmax output kept for backward,
        loss = 12 * T * V  # then nll's gradient and log_softmax's gradient, all [tokens, vocab] fp32
        what = "loss backward (fp32 log_softmax output + 2 gradients over the logits)"
    else:  # TRL's fused head scores tiles of 4096 tokens x 32768 vocab; keeps a copy of the hidden states
        scored = B * (S - 1)  # worst case: every label counts
        tile = min(scored, 4096) * min(V, 32768)
        # Triton folds the tile in place. The torch fallback's backward (trl/kernels/chunked_logprob.py,
        # _backward_tile) holds the tile, 5 fp32 tiles (y, z, log_p, p, grad), a bool mask, 2 fp32 temporaries.
        loss = scored * H * (c + 4) + tile * (c if run.triton else c + 5 * 4 + 1 + 2 * 4)  # + fp32 grad of hidden
        what = "fused LM head backward (chunked logits, fp32 hidden-state gradient)"
    phases[what] = before_loss + loss
    moment = max(phases, key=phases.get)
    if moment == what:
        activ = [*_kept_rows(L - N, N, inputs, N * whole), ("final norm input (fp32)", norm)]
        activ.append(("logits + loss buffers", loss))
    else:
        whole_n, kept, own, (dequant, rest) = moe[moment]
        activ = [*_kept_rows(L - N, whole_n, inputs, kept - inputs), ("this layer's saved activations", own)]
        activ.append(("MoE activations + gradients", rest))
        if dequant:
            which = {w_gu: "gate_up_proj", w_dn: "down_proj"}.get(dequant, "gate_up_proj + down_proj")
            activ.append((f"dequant workspace ({which}, {dtype_name(c)})", dequant))
    return Estimate(rows + activ, moment, phases, sum(b for _, b in weights))


def _kept_rows(checkpointed: int, whole: int, inputs: int, saves: int) -> list[tuple[str, int]]:
    rows = [(f"checkpointed inputs, {checkpointed} layers", inputs)] if checkpointed else []
    return rows + ([(f"saved activations, {whole} layers", saves)] if whole else [])


def dtype_name(c: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(c, f"{c}-byte")
