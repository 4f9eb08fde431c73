"""The peak-memory model behind `mixtral-ft plan`: bytes per GPU alive at a training step's peak.

The estimate accounts for the tensors alive at the step's peak, term by term: the weights by group, LoRA
weights, gradients and optimizer states, the activations kept for backward, and the working set of the
moment the step peaks: the loss over the logits, or one layer's recompute and backward, where an expert
weight is dequantized whole (quant._NF4GroupedLinear). That is what `torch.cuda.max_memory_allocated`
reports. It needs only the model's shape (`Dims`) and the run's settings (`Run`); preflight.py reads those
from a recipe and turns the estimate into a verdict and advice.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixtral_ft.plan.inputs import Dims, Run, Step, dtype_name, nf4_bytes
from mixtral_ft.plan.lora import attention_lora_saves, lora_rows, model_lora_saves

__all__ = ["Dims", "Estimate", "Run", "estimate"]


@dataclass
class Estimate:
    rows: list[tuple[str, int]]  # components alive at the peak; they sum to `peak`
    moment: str  # when the step peaks
    phases: dict[str, int]  # activation peak of each candidate moment (for the JSON and the notes)
    weights: int

    @property
    def peak(self) -> int:
        return sum(b for _, b in self.rows)


def estimate(d: Dims, run: Run) -> Estimate:
    s = Step.of(d, run)
    weights, saves = weight_rows(d, run, s), layer_saves(d, run, s)
    embed, head = model_lora_saves(d, run, s)  # LoRA on embed_tokens and lm_head: 0 without
    moe = moe_candidates(d, run, s, saves)
    phases = {m: kept + own + sum(b) + embed for m, (_, kept, own, b) in moe.items()}
    what, loss = loss_term(d, run, s)
    inputs = (d.layers - s.N) * s.T * d.hidden * s.c  # each recomputed layer's input, kept by checkpointing
    phases[what] = inputs + s.N * saves.whole + saves.norm + loss + embed + head  # final norm: its fp32 input
    moment = max(phases, key=phases.get)
    if moment == what:
        activ = [*_kept_rows(d.layers - s.N, s.N, inputs, s.N * saves.whole), ("final norm input (fp32)", saves.norm)]
        activ.append(("logits + loss buffers", loss))
    else:
        activ, head = moe_rows(d, run, s, inputs, moe[moment]), 0  # lm_head's backward has freed its saves
    if embed + head:
        activ.append(("LoRA saves on embed_tokens / lm_head", embed + head))
    return Estimate(weights + lora_rows(d, run, s) + activ, moment, phases, sum(b for _, b in weights))


# --- weights: embeddings and lm_head, norms and router in the compute dtype; attention (and experts) NF4


def weight_rows(d: Dims, run: Run, s: Step) -> list[tuple[str, int]]:
    c, L, H, F, E, V = s.c, d.layers, d.hidden, d.inter, d.experts, d.vocab
    experts = (nf4_bytes(E * 2 * F * H) + nf4_bytes(E * H * F)) if run.quantize_experts else 3 * E * F * H * c
    attention = L * sum(map(nf4_bytes, (s.qw * H, s.kvw * H, s.kvw * H, H * s.qw)))
    return [
        ("embeddings", V * H * c),
        ("attention (NF4)", attention),
        ("router", L * E * H * c),
        ("experts (NF4)" if run.quantize_experts else f"experts ({dtype_name(c)})", L * experts),
        ("norms", (2 * L + 1) * H * c),
        ("lm_head", 0 if d.tied else V * H * c),
    ]


# --- activations kept for backward by one decoder layer (steady state)


@dataclass(frozen=True)
class Saves:
    norm: int  # an RMSNorm's saves
    norm1: int  # the first norm's, in a recomputed layer
    common: int  # what is still kept when the layer's experts run or backprop
    gate_up: int  # the experts' gate_up output
    act: int  # silu(gate)
    whole: int  # a layer kept whole: its first norm keeps its own fp32 input copy


def layer_saves(d: Dims, run: Run, s: Step) -> Saves:
    T, Tk, c, E, k = s.T, s.Tk, s.c, d.experts, d.top_k
    norm = T * d.hidden * 4 + T * 4  # RMSNorm keeps its fp32 input (a copy under bf16) and 1/rms
    norm1 = T * 4 if c == 4 else norm  # fp32, recomputed layers: that input *is* the checkpointed one
    attn = norm1 + attention_saves(d, run, s)
    router = T * E * 4 + T * k * (8 + 4 + 4) + T * 4  # fp32 softmax, top-k indices and weights, their sum
    index = Tk * (3 * 8 + 4)  # sort order, its row index, the inverse permutation; routing weights in order
    gate_up, act, down32 = Tk * 2 * d.inter * c, Tk * d.inter * c, Tk * d.hidden * 4  # fp32 down out
    common = attn + norm + router + index
    layer = common + gate_up + act + down32
    return Saves(norm, norm1, common, gate_up, act, layer - norm1 + norm)


def attention_saves(d: Dims, run: Run, s: Step) -> int:
    """LoRA's saves, and sdpa's q, k, v, output and logsumexp."""
    kv_kept = s.qw if run.padded else s.kvw  # with a mask, transformers' sdpa passes repeat_kv copies of k and v
    sdpa = 2 * s.T * s.qw * s.c + 2 * s.T * kv_kept * s.c + s.B * d.heads * run.seq * 4
    return attention_lora_saves(d, run, s) + sdpa


# --- one layer's MoE: the moments where a whole dequantized expert weight meets the big activations


def dequantized(d: Dims, run: Run, s: Step) -> tuple[int, int]:
    """gate_up_proj's and down_proj's weights dequantized whole, with their fp32 absmax (4 B per 64)."""
    if not run.quantize_experts:
        return 0, 0
    E, F, H = d.experts, d.inter, d.hidden
    return E * 2 * F * H * (s.c * 16 + 1) // 16, E * H * F * (s.c * 16 + 1) // 16


def moments(d: Dims, run: Run, s: Step, saves: Saves, recompute: bool) -> dict[str, tuple[int, int]]:
    """moment: (dequantized weight, everything else of this MoE); silu(gate) and its product are `act`s.

    Checkpointing recomputes a layer when backward first needs it: the gradient arriving then is the
    residual's plus the fp32 [tokens*top_k, H] copy that un-summing the experts' outputs makes. With reuse,
    the recompute's gate_up_proj weight stays until its backward, beside down_proj's."""
    w_gu, w_dn = dequantized(d, run, s)
    gate_up, act, c, H = saves.gate_up, saves.act, s.c, d.hidden
    n2, by_expert, grad = s.T * H * c, s.Tk * H * c, s.T * H * c  # router input, rows sorted by expert, residual grad
    in_flight, how = (grad + s.Tk * H * 4, "recompute") if recompute else (0, "forward")
    held = w_gu if recompute and run.reuse_dequantized else 0
    return {
        f"{how} through gate_up_proj": (w_gu, in_flight + n2 + by_expert + gate_up),
        f"{how} through down_proj": (w_dn + held, in_flight + n2 + by_expert + gate_up + 2 * act + s.Tk * H * c),
        "backward through down_proj": (w_dn + held, grad + gate_up + 2 * act + s.Tk * H * c),
        "backward through silu(gate) * up": (held, grad + gate_up + 3 * act),  # gate_up, d(act), d(up), d(gate)
        "backward through gate_up_proj": (w_gu, grad + gate_up + by_expert),  # d(gate_up), d(rows)
    }


Moment = tuple[int, int, int, tuple[int, int]]  # earlier layers kept whole, their saves + all inputs, own saves, MoE


def moe_candidates(d: Dims, run: Run, s: Step, saves: Saves) -> dict[str, Moment]:
    """The last layer if it is kept whole (every earlier one's saves alive), and the last recomputed layer (the
    whole layers' saves already freed by their backward): each layer's inputs are kept by checkpointing."""
    L, N = d.layers, s.N
    inputs = (L - N) * s.T * d.hidden * s.c
    candidates = {}
    if N:
        own = saves.common - saves.norm1 + saves.norm
        candidates["last layer"] = (N - 1, inputs + (N - 1) * saves.whole, own, moments(d, run, s, saves, False))
    if N < L:
        recomputed = "last layer" if N == 0 else f"layer {L - N} (last recomputed)"
        candidates[recomputed] = (0, inputs, saves.common, moments(d, run, s, saves, True))
    return {
        f"{where}, {m}": (n, kept, own, b) for where, (n, kept, own, ms) in candidates.items() for m, b in ms.items()
    }


def moe_rows(d: Dims, run: Run, s: Step, inputs: int, moment: Moment) -> list[tuple[str, int]]:
    whole_n, kept, own, (dequant, rest) = moment
    rows = [*_kept_rows(d.layers - s.N, whole_n, inputs, kept - inputs), ("this layer's saved activations", own)]
    rows.append(("MoE activations + gradients", rest))
    if dequant:
        w_gu, w_dn = dequantized(d, run, s)
        which = {w_gu: "gate_up_proj", w_dn: "down_proj"}.get(dequant, "gate_up_proj + down_proj")
        rows.append((f"dequant workspace ({which}, {dtype_name(s.c)})", dequant))
    return rows


# --- the loss, after the final norm


def loss_term(d: Dims, run: Run, s: Step) -> tuple[str, int]:
    """(the moment, the bytes of logits and loss buffers alive at it)."""
    T, V, c = s.T, d.vocab, s.c
    if run.loop == "plain":  # transformers' ForCausalLMLoss: fp32 log_softmax output kept for backward,
        loss = 12 * T * V  # then nll's gradient and log_softmax's gradient, all [tokens, vocab] fp32
        return "loss backward (fp32 log_softmax output + 2 gradients over the logits)", loss
    # TRL's fused head scores tiles of 4096 tokens x 32768 vocab; keeps a copy of the hidden states
    scored = s.B * (run.seq - 1)  # worst case: every label counts
    tile = min(scored, 4096) * min(V, 32768)
    # Triton folds the tile in place. The torch fallback's backward (trl/kernels/chunked_logprob.py,
    # _backward_tile) holds the tile, 5 fp32 tiles (y, z, log_p, p, grad), a bool mask, 2 fp32 temporaries.
    loss = scored * d.hidden * (c + 4) + tile * (c if run.triton else c + 5 * 4 + 1 + 2 * 4)  # + fp32 grad of hidden
    return "fused LM head backward (chunked logits, fp32 hidden-state gradient)", loss


def _kept_rows(checkpointed: int, whole: int, inputs: int, saves: int) -> list[tuple[str, int]]:
    rows = [(f"checkpointed inputs, {checkpointed} layers", inputs)] if checkpointed else []
    return rows + ([(f"saved activations, {whole} layers", saves)] if whole else [])
