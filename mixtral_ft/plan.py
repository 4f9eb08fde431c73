"""`mixtral-ft plan RECIPE`: predict the peak memory per GPU of a recipe's run without loading the model.

Only the model's config.json is read. The estimate accounts for the tensors alive at the step's peak,
term by term: the weights by group, LoRA weights, gradients and optimizer states, the activations kept
for backward, and the working set of the moment the step peaks: the loss over the logits, or one layer's
recompute and backward, where an expert weight is dequantized whole (quant._NF4GroupedLinear). That is
what `torch.cuda.max_memory_allocated` reports; the CUDA context comes on top (RESERVE_GIB).

Checked against exact measurements: tests/test_plan.py runs the tiny model on CPU under a tensor-bytes
tracker, and `compare_bench` checks a `mixtral-ft bench` result file from a GPU (bench.py's plain loop).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import ATTENTION_TARGETS

GIB = 2**30
RESERVE_GIB = 1.0  # CUDA context and kernels: on the GPU but outside the allocator's count


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
        h, heads = get("hidden_size"), get("num_attention_heads")
        return cls(get("num_hidden_layers"), h, get("intermediate_size"), heads, get("num_key_value_heads"),
                   get("head_dim") or h // heads, get("num_local_experts"), get("num_experts_per_tok"),
                   get("vocab_size"), bool(get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class Run:
    batch: int  # examples per micro-batch on one GPU
    seq: int  # tokens per sequence (the worst case: every row max_length long)
    rows: int = 1  # sequences per example: 2 for DPO (chosen and rejected go through together)
    dtype_bytes: int = 2  # compute dtype: 2 for bf16/fp16, 4 for fp32
    checkpointing: bool = True
    quantize_experts: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ATTENTION_TARGETS
    lora_dropout: float = 0.0
    optim: str = "adamw_torch"
    loop: str = "trainer"  # trainer: TRL (autocast, fused LM head on a GPU); plain: bench.py's loop
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
    T, Tk, qw, kvw = B * S, B * S * k, d.heads * d.head_dim, d.kv_heads * d.head_dim

    # --- weights: embeddings and lm_head, norms and router in the compute dtype; attention (and experts) NF4
    experts = (nf4_bytes(E * 2 * F * H) + nf4_bytes(E * H * F)) if run.quantize_experts else 3 * E * F * H * c
    attention = L * sum(map(nf4_bytes, (qw * H, kvw * H, kvw * H, H * qw)))
    weights = [("embeddings", V * H * c), ("attention (NF4)", attention), ("router", L * E * H * c),
               ("experts (NF4)" if run.quantize_experts else f"experts ({_dtype(c)})", L * experts),
               ("norms", (2 * L + 1) * H * c), ("lm_head", 0 if d.tied else V * H * c)]
    # --- LoRA: peft keeps A and B in fp32 on a 4-bit base; grads fp32; optimizer states per parameter
    shapes = {"q_proj": (H, qw), "k_proj": (H, kvw), "v_proj": (H, kvw), "o_proj": (qw, H)}
    lora = L * run.lora_r * sum(sum(shapes[t]) for t in run.lora_targets if t in shapes)
    autocast = run.loop == "trainer" and c < 4  # the HF Trainer runs bf16/fp16 under torch.autocast
    # Grads counted whole: with accumulation they persist between micro-batches (without, they are 0.2% here).
    rows = weights + [("LoRA weights (fp32)", 4 * lora), ("LoRA grads (fp32)", 4 * lora),
                      (f"optimizer states ({run.optim})", optimizer_bytes_per_param(run.optim) * lora)]
    if autocast:  # bf16 copies of the LoRA weights, kept for backward: one layer's when checkpointing recomputes
        rows.append(("LoRA bf16 copies (autocast)", c * lora // (L if run.checkpointing else 1)))
    if run.num_gpus > 1:  # DDP all-reduces through flat buckets: a second copy of the gradients
        rows.append(("DDP gradient buckets", 4 * lora))

    # --- activations kept for backward by one decoder layer (steady state)
    norm = T * H * 4 + T * 4  # RMSNorm keeps its fp32 input (a copy under bf16) and 1/rms
    norm1 = norm if c < 4 or not run.checkpointing else T * 4  # fp32: that input *is* the checkpointed one
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
    attn = (norm1 + lora_inputs(n_qkv, H, False) + lora_inputs(int("o_proj" in run.lora_targets), qw, True)
            + len(run.lora_targets) * T * run.lora_r * lb  # lora_A's output, kept by lora_B
            + 2 * T * qw * c + 2 * T * kv_kept * c + B * d.heads * S * 4)  # sdpa: q, k, v, output, logsumexp
    router = T * E * 4 + T * k * (8 + 4 + 4) + T * 4  # fp32 softmax, top-k indices and weights, their sum
    index = Tk * (3 * 8 + 4)  # sort order, its row index, the inverse permutation; routing weights in order
    gate_up, act, down32 = Tk * 2 * F * c, Tk * F * c, Tk * H * 4  # gate_up out; silu(gate); fp32 down out
    layer = attn + norm + router + index + gate_up + act + down32
    common = attn + norm + router + index  # what is still kept when the layer's experts run or backprop

    # --- one layer's MoE: the moments where a whole dequantized expert weight meets the big activations
    w_gu = E * 2 * F * H * (c * 16 + 1) // 16 if run.quantize_experts else 0  # + the fp32 absmax (4 B per 64)
    w_dn = E * H * F * (c * 16 + 1) // 16 if run.quantize_experts else 0
    n2, by_expert, grad = T * H * c, Tk * H * c, T * H * c  # router input, rows sorted by expert, residual grad
    # Checkpointing recomputes a layer when backward first needs it: the gradient arriving then is the
    # residual's plus the fp32 [tokens*top_k, H] copy that un-summing the experts' outputs makes.
    in_flight = grad + Tk * H * 4 if run.checkpointing else 0
    how = "recompute" if run.checkpointing else "forward"
    moe = {  # moment: (dequantized weight, everything else of this MoE); silu(gate) and its product are `act`s
        f"{how} through gate_up_proj": (w_gu, in_flight + n2 + by_expert + gate_up),
        f"{how} through down_proj": (w_dn, in_flight + n2 + by_expert + gate_up + 2 * act + Tk * H * c),
        "backward through down_proj": (w_dn, grad + gate_up + 2 * act + Tk * H * c),
        "backward through silu(gate) * up": (0, grad + gate_up + 3 * act),  # gate_up, d(act), d(up), d(gate)
        "backward through gate_up_proj": (w_gu, grad + gate_up + by_expert),  # d(gate_up), d(rows)
    }
    kept = L * T * H * c if run.checkpointing else (L - 1) * layer  # the layer inputs, or every layer's saves
    phases = {f"last layer, {m}": kept + common + sum(b) for m, b in moe.items()}

    # --- the loss, after the final norm (which keeps its fp32 input too)
    before_loss = (L * T * H * c if run.checkpointing else L * layer) + norm
    if run.loop == "plain":  # transformers' ForCausalLMLoss: fp32 log_softmax output kept for backward,
        loss = 12 * T * V  # then nll's gradient and log_softmax's gradient, all [tokens, vocab] fp32
        what = "loss backward (fp32 log_softmax output + 2 gradients over the logits)"
    else:  # TRL's fused head scores tiles of 4096 tokens x 32768 vocab; keeps a copy of the hidden states
        N = B * (S - 1)  # worst case: every label counts
        tile = min(N, 4096) * min(V, 32768)
        # Triton folds the tile in place. The torch fallback's backward (trl/kernels/chunked_logprob.py,
        # _backward_tile) holds the tile, 5 fp32 tiles (y, z, log_p, p, grad), a bool mask, 2 fp32 temporaries.
        loss = N * H * (c + 4) + tile * (c if run.triton else c + 5 * 4 + 1 + 2 * 4)  # + fp32 grad of hidden
        what = "fused LM head backward (chunked logits, fp32 hidden-state gradient)"
    phases[what] = before_loss + loss
    moment = max(phases, key=phases.get)
    if moment == what:
        activ = [(f"checkpointed inputs, {L} layers" if run.checkpointing else f"saved activations, {L} layers",
                  before_loss - norm), ("final norm input (fp32)", norm), ("logits + loss buffers", loss)]
    else:
        dequant, rest = moe[moment.removeprefix("last layer, ")]
        held = f"checkpointed inputs, {L} layers" if run.checkpointing else f"saved activations, {L - 1} layers"
        activ = [(held, kept), ("last layer's saved activations", common), ("MoE activations + gradients", rest)]
        if dequant:
            which = "gate_up_proj" if dequant == w_gu else "down_proj"
            activ.append((f"dequant workspace ({which}, {_dtype(c)})", dequant))
    return Estimate(rows + activ, moment, phases, sum(b for _, b in weights))


def _dtype(c: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(c, f"{c}-byte")


# --- from a recipe ---------------------------------------------------------------------------------

def load_dims(name: str, revision: str | None = None) -> tuple[Dims, bool | None, list[str]]:
    """The model's shape from its config.json (no weights), the manifest's quantize_experts, and notes."""
    from mixtral_ft.loader import read_manifest
    from mixtral_ft.model import HUB_ID
    from mixtral_ft.tiny import TINY_NAME

    if name == TINY_NAME:
        from mixtral_ft.tiny import tiny_config

        return Dims.of(tiny_config()), None, []
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{path}' has no config.json: point model.name at a Mixtral checkpoint")
        manifest = read_manifest(path)  # a pre-quantized folder is what it is (as load_model)
        experts = manifest["quantize_experts"] if manifest else None
        return Dims.of(json.loads((path / "config.json").read_text())), experts, []
    if not HUB_ID.match(name):
        raise UserError(f"model '{name}' is neither a local folder nor a hub id like mistralai/Mixtral-8x7B-v0.1")
    try:
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(name, "config.json", revision=revision)).read_text())
    except Exception as exc:  # offline, gated, missing: fall back only where the shape is known
        if "mixtral-8x7b" not in name.lower():
            raise UserError(f"could not fetch {name}'s config.json ({type(exc).__name__}): check the id and your "
                            "network, or set model.name to a local folder with its config.json") from None
        from mixtral_ft.bench import mixtral_config

        return Dims.of(mixtral_config(32)), None, [f"{name}'s config.json could not be fetched "
                                                    f"({type(exc).__name__}): used Mixtral-8x7B's shape"]
    return Dims.of(config), None, []


def run_for(recipe, num_gpus: int = 1, quantize_experts: bool | None = None) -> Run:
    t, lo = recipe.train, recipe.lora
    return Run(batch=t.per_device_train_batch_size, seq=t.max_length, rows=2 if t.method == "dpo" else 1,
               dtype_bytes=4 if recipe.model.compute_dtype == "float32" else 2,  # auto: bf16 on a GPU
               checkpointing=t.gradient_checkpointing,
               quantize_experts=recipe.model.quantize_experts if quantize_experts is None else quantize_experts,
               lora_r=lo.r, lora_targets=tuple(lo.target_modules), lora_dropout=lo.dropout, optim=t.optim,
               padded=not t.packing, num_gpus=num_gpus)


def fsdp_gib(d: Dims, est: Estimate, n: int) -> float:
    """Per GPU under FSDP over n GPUs: the weights sharded, plus the 2 layers it gathers at a time (prefetch)."""
    size = dict(est.rows)
    layer = sum(b for name, b in size.items() if name.startswith(("attention", "experts"))) / d.layers
    return (est.peak - est.weights + est.weights / n + 2 * layer) / GIB


def advise(d: Dims, run: Run, accumulation: int, usable: float) -> list[str]:
    """Concrete overrides, each with its predicted peak: for a run that does not fit, or fits with room."""
    def gib(r: Run) -> float:
        return estimate(d, r).peak / GIB

    peak, out, B, S = gib(run), [], run.batch, run.seq
    if peak > usable:
        tries = []
        if not run.checkpointing:
            tries.append((["train.gradient_checkpointing=true"], replace(run, checkpointing=True)))
        if not run.quantize_experts:
            tries.append((["model.quantize_experts=true"], replace(run, quantize_experts=True)))
        smaller = [b for b in range(B - 1, 0, -1) if gib(replace(run, batch=b)) <= usable]
        for b in smaller[:1] or ([1] if B > 1 else []):  # the same global batch: more accumulation steps
            steps = math.ceil(B * accumulation / b)
            tries.append(([f"train.per_device_train_batch_size={b}", f"train.gradient_accumulation_steps={steps}"],
                          replace(run, batch=b)))
        lengths = [s for s in (S // 2, S // 4, S // 8) if s >= 256]
        for s in [s for s in lengths if gib(replace(run, seq=s)) <= usable][:1] or lengths[-1:]:
            tries.append(([f"train.max_length={s}"], replace(run, seq=s)))  # longer rows are truncated
        if optimizer_bytes_per_param(run.optim) > 2:
            tries.append((["train.optim=paged_adamw_8bit"], replace(run, optim="paged_adamw_8bit")))
        for keys, r in tries:
            if gib(r) < 0.99 * peak:  # a lever that saves under 1% is not advice
                out.append(f"{' '.join(keys)}: {gib(r):.1f} GiB{' (fits)' if gib(r) <= usable else ''}")
        least = replace(run, checkpointing=True, quantize_experts=True, batch=1, seq=min(S, 256), optim="sgd")
        if gib(least) > usable:  # nothing in the recipe helps: the weights themselves are too big
            est = estimate(d, replace(run, checkpointing=True, quantize_experts=True))
            n = next((n for n in range(2, 65) if fsdp_gib(d, est, n) <= usable), None)
            out.append(f"the weights alone need {est.weights / GIB:.1f} GiB: "
                       + (f"shard them with FSDP over {n} GPUs (train --num-processes {n} --accelerate-config "
                          f"accelerate_configs/fsdp_qlora.yaml): about {fsdp_gib(d, est, n):.1f} GiB per GPU, or "
                          if n else "") + "use a bigger GPU")
    elif peak < 0.6 * usable:  # lots of room: a bigger micro-batch (fewer accumulation steps) runs faster
        bigger = [b for b in range(2 * B, 65) if gib(replace(run, batch=b)) <= 0.85 * usable]
        if bigger:
            b = bigger[-1]
            acc = f" train.gradient_accumulation_steps={max(1, B * accumulation // b)}" if accumulation > 1 else ""
            out.append(f"room to spare: train.per_device_train_batch_size={b}{acc}: "
                       f"{gib(replace(run, batch=b)):.1f} GiB (faster steps)")
        if run.checkpointing and gib(replace(run, checkpointing=False)) <= 0.85 * usable:
            out.append(f"train.gradient_checkpointing=false: {gib(replace(run, checkpointing=False)):.1f} GiB "
                       "(no recompute: about a quarter faster)")
    return out


def plan(recipe, *, gpu_mem: float = 80.0, num_gpus: int = 1) -> dict:
    """Everything `mixtral-ft plan` prints, as a dict (the --json output)."""
    if gpu_mem <= RESERVE_GIB or num_gpus < 1:
        raise UserError(f"--gpu-mem must be more than the {RESERVE_GIB:g} GiB kept for the CUDA context (GiB per "
                        f"GPU, e.g. 80) and --num-gpus at least 1; got {gpu_mem:g} and {num_gpus}")
    d, manifest_experts, notes = load_dims(recipe.model.name, recipe.model.revision)
    run = run_for(recipe, num_gpus, manifest_experts)
    est, usable = estimate(d, run), gpu_mem - RESERVE_GIB
    peak = est.peak / GIB
    notes.append("per GPU, for a batch whose longest row is max_length; shorter batches need less")
    if run.rows == 2:
        notes.append("DPO: chosen and rejected rows go through together (2 sequences per example)")
    if num_gpus > 1:
        notes.append(f"DDP (the default launcher) keeps the whole model on each of the {num_gpus} GPUs; FSDP "
                     f"(--accelerate-config accelerate_configs/fsdp_qlora.yaml) shards the weights: about "
                     f"{fsdp_gib(d, est, num_gpus):.1f} GiB per GPU")
    if usable * 0.9 < peak <= usable:
        notes.append("tight: allocator fragmentation can add a few percent "
                     "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps)")
    return {"model": recipe.model.name, "gpu_mem_gib": gpu_mem, "num_gpus": num_gpus, "usable_gib": usable,
            "settings": {k: v for k, v in vars(run).items() if k != "triton"},
            "components": [{"name": n, "bytes": int(b), "gib": round(b / GIB, 3)} for n, b in est.rows],
            "peak_bytes": int(est.peak), "peak_gib": round(peak, 2), "weights_gib": round(est.weights / GIB, 2),
            "peak_at": est.moment, "phases_gib": {k: round(v / GIB, 3) for k, v in est.phases.items()},
            "fits": peak <= usable, "advice": advise(d, run, recipe.train.gradient_accumulation_steps, usable), "notes": notes}


def render(report: dict) -> str:
    s, unit = report["settings"], ("GiB", GIB) if report["peak_bytes"] >= GIB else ("MiB", 2**20)  # tiny: MiB
    lines = [f"{report['model']}: batch {s['batch']} x {s['seq']} tokens, {_dtype(s['dtype_bytes'])}, checkpointing "
             f"{'on' if s['checkpointing'] else 'off'}, experts {'NF4' if s['quantize_experts'] else 'unquantized'}, "
             f"{report['num_gpus']} GPU(s)", f"{'component':<44} {unit[0]:>7}"]
    lines += [f"{c['name']:<44} {c['bytes'] / unit[1]:>7.2f}" for c in report["components"]]
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines += [f"{'peak per GPU':<44} {report['peak_bytes'] / unit[1]:>7.2f}   at: {report['peak_at']}",
              f"{verdict} in {report['gpu_mem_gib']:g} GiB ({RESERVE_GIB:g} GiB kept for the CUDA context): "
              f"{report['usable_gib'] - report['peak_bytes'] / GIB:+.1f} GiB to spare"]
    lines += [f"note: {n}" for n in report["notes"]] + [f"advice: {a}" for a in report["advice"]]
    return "\n".join(lines)


def run_plan(recipe_path: str, overrides=(), *, gpu_mem: float = 80.0, num_gpus: int = 1, as_json=False) -> int:
    from mixtral_ft.recipe import load_recipe

    report = plan(load_recipe(recipe_path, overrides), gpu_mem=gpu_mem, num_gpus=num_gpus)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["fits"] else 1


# --- against a `mixtral-ft bench` result -----------------------------------------------------------

def compare_bench(run: dict) -> dict:
    """Plan's prediction for one run of a GPU `mixtral-ft bench` result file (its plain loop, default levers).

    Bench resets the peak after building, so the peak is the training step's (issue 3 bounds the build apart).
    """
    from mixtral_ft.bench import mixtral_config
    from mixtral_ft.tiny import tiny_config

    d = Dims.of(tiny_config() if run["model"] == "tiny" else mixtral_config(run["layers"]))
    est = estimate(d, Run(run["batch"], run["seq"], dtype_bytes=4 if run["dtype"] == "float32" else 2,
                          checkpointing=run["levers"]["checkpointing"], loop="plain", padded=False))
    return {"predicted_gib": round(est.peak / GIB, 3), "measured_gib": run["peak_gib"],
            "error": est.peak / GIB / run["peak_gib"] - 1, "weights_predicted_gib": round(est.weights / GIB, 3),
            "weights_measured_gib": run.get("weights_gib"), "peak_at": est.moment}
