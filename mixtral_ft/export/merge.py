"""`mixtral-ft merge`: fold a QLoRA adapter into the base weights, one checkpoint shard at a time.

The adapter was trained against NF4-dequantized weights, not the checkpoint's bf16 ones, so merging
into the bf16 weights gives a model that is not the one that was trained (peft #2105, #1080;
transformers #31293). The default, `base_weights="dequantized"`, writes W' = dequant(NF4(W)) + scale·B·A
for the adapted projections and replaces every other weight that `load_model` quantizes (attention, and
the experts unless the run kept them bf16) by its NF4 round trip: the merged model computes what
adapter-on-NF4-base computed in training. `"original"` merges into the checkpoint's weights as they are.

Output keeps the source's tensor names, layout (legacy per-expert or fused) and shard files, so plain
`AutoModelForCausalLM.from_pretrained(out)` loads it. Peak host memory is one shard plus one layer of
experts (the NF4 round trip must see a whole layer, see `_LegacyExperts`) plus the adapter.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from mixtral_ft.common import say
from mixtral_ft.errors import UserError
from mixtral_ft.model.load import DTYPES
from mixtral_ft.train.checksums import file_digest

ATTENTION_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$")
FUSED_EXPERT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
BASE_WEIGHTS = ("dequantized", "original")


def nf4_roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    """What `load_model` computes with: NF4 (blocksize 64, double quant) and back, in fp32."""
    from mixtral_ft.model.quant import dequantize_nf4, quantize_nf4

    return dequantize_nf4(quantize_nf4(tensor, "cpu", torch.float32))


def merge_adapter(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    base_weights: str = "dequantized",
    base: str | None = None,
    dtype: str = "auto",
    verify: bool = False,
    device: str | None = None,
) -> dict:
    """Write the merged model to `out` (new or empty); returns merge.json's content (+ the verify report)."""
    from mixtral_ft.export.staging import refuse_nonempty, staged_folder
    from mixtral_ft.export.verify import verify_merge
    from mixtral_ft.model.load import adapter_base, check_device
    from mixtral_ft.model.loader import read_manifest
    from mixtral_ft.model.source import resolve_model_path
    from mixtral_ft.train.card import write_card, write_scrubbed

    adapter, out = Path(adapter_dir), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"adapter folder '{adapter}' not found or has no adapter_config.json: pass a training output_dir"
        )
    refuse_nonempty(out, "--out")  # now, before any work; staged_folder checks again as it starts
    if out.resolve().is_relative_to(adapter.resolve()):  # `push` of the adapter would upload the whole model too
        raise UserError(f"--out '{out}' is inside the adapter folder '{adapter}': choose a folder outside it")
    if base_weights not in BASE_WEIGHTS:
        raise UserError(f"--base-weights must be one of {', '.join(BASE_WEIGHTS)}")
    if verify:
        check_device(device)  # now, not after the merge
    recorded_base, model_cfg = adapter_base(adapter)
    base_name = base or recorded_base
    if not base_name:
        raise UserError(f"adapter '{adapter}' does not say which base model it belongs to: pass --base MODEL")
    source = resolve_model_path(base_name, None if base else model_cfg.get("revision"))
    if read_manifest(source) is not None:
        raise UserError(
            f"base '{source}' is a pre-quantized NF4 folder: merging needs the original checkpoint; "
            "pass it with --base (e.g. --base mistralai/Mixtral-8x7B-v0.1)"
        )
    quantize_experts = bool(model_cfg.get("quantize_experts", True))
    lora = _read_lora(adapter)

    with staged_folder(out, "--out") as staging:  # an interrupted merge leaves no half-written model
        say("merge", f"{len(lora)} LoRA weights from {adapter} into {base_name} ({base_weights} base weights)")
        written = _merge_shards(
            source, staging, lora, base_weights == "dequantized", quantize_experts, DTYPES.get(dtype)
        )
        _write_side_files(source, adapter, staging, written)
        # `base` as the user knows it (hub id, `tiny`), not the cache folder it resolved to: the card shows it.
        shown = base or model_cfg.get("name") or base_name
        info = {
            "format": "mixtral_ft-merged",
            "version": 1,
            "adapter": str(adapter),
            "adapter_sha256": file_digest(adapter / "adapter_model.safetensors"),
            "base": shown,
            "base_path": str(source),
            "base_weights": base_weights,
            "quantize_experts": quantize_experts,
            "dtype": written["dtype"],
            "lora_tensors": len(lora),
        }
        write_scrubbed(staging / "merge.json", json.dumps(info, indent=2) + "\n")
        if verify:
            report = verify_merge(
                staging,
                adapter,
                source,
                quantize_experts=quantize_experts,
                device=device,
                weights_dtype=written["dtype"],
            )
            write_scrubbed(staging / "verify.json", json.dumps(report, indent=2) + "\n")
            info["verify"] = report
        write_card(staging, "model", title=out.name, ref=str(out))
    return info


def merged_in(model: Path, adapter: Path) -> bool:
    """Whether `model` is a merged folder whose merge.json names these very adapter weights."""
    try:
        info = json.loads((model / "merge.json").read_text())
        return info["adapter_sha256"] == file_digest(adapter / "adapter_model.safetensors")
    except (OSError, ValueError, KeyError, TypeError):  # not merged, merged before the hash was kept, no weights
        return False


def _read_lora(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{checkpoint weight name: (A, B, scale)} for a plain LoRA adapter; anything fancier is refused."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    unsupported = [
        k
        for k in (
            "use_dora",
            "lora_bias",
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "trainable_token_indices",
            "target_parameters",
            "fan_in_fan_out",
        )
        if cfg.get(k)
    ]
    if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise UserError(
            f"adapter '{adapter}' uses {unsupported or cfg.get('peft_type')}: merge supports plain "
            "LoRA adapters as mixtral-ft trains them"
        )
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"adapter folder '{adapter}' has no adapter_model.safetensors")
    state = load_file(str(weights))
    lora = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = state[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        # peft's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA.
        scale = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
        lora[module + ".weight"] = (a.float(), b.float(), scale)
    if not lora:
        raise UserError(f"adapter '{adapter}' holds no LoRA weights")
    return lora


def _merge_shards(
    source: Path, staging: Path, lora: dict, dequantized: bool, quantize_experts: bool, out_dtype: torch.dtype | None
) -> dict:
    """Read, transform and write each source shard in turn; returns what was written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mixtral_ft.model.loader import LEGACY_EXPERT, LEGACY_ROUTER, checkpoint_shards

    shards = checkpoint_shards(source)
    experts = _LegacyExperts(source, shards)
    pending = dict(lora)
    weight_map, total, dtypes = {}, 0, set()
    for number, shard in enumerate(shards, 1):
        say("merge", f"shard {number}/{len(shards)} ({shard.name})")
        tensors = {}
        with safe_open(str(shard), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                tensor = reader.get_tensor(key)
                target = out_dtype or tensor.dtype
                legacy = LEGACY_EXPERT.match(key)
                roundtrip_expert = dequantized and quantize_experts
                if (dequantized and ATTENTION_KEY.match(key)) or (roundtrip_expert and FUSED_EXPERT_KEY.match(key)):
                    value = nf4_roundtrip(tensor)
                elif roundtrip_expert and legacy:
                    value = experts.get(int(legacy[1]), int(legacy[2]), legacy[3])
                else:
                    value = tensor  # untouched: in the source dtype it is copied bit for bit
                delta = pending.pop(LEGACY_ROUTER.sub(r"\1.mlp.gate.weight", key), None)
                if delta is not None:
                    a, b, scale = delta
                    if (b.shape[0], a.shape[1]) != tuple(value.shape):
                        raise UserError(
                            f"adapter weight for {key} is {b.shape[0]}x{a.shape[1]} but the base's is "
                            f"{'x'.join(map(str, value.shape))}: pass the base the adapter was trained on (--base)"
                        )
                    value = value.float() + scale * (b @ a)  # in fp32, then one rounding to the output dtype
                tensors[key] = value.to(target if value.is_floating_point() else value.dtype).contiguous()
                dtypes.add(str(tensors[key].dtype).removeprefix("torch."))
        save_file(tensors, str(staging / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if pending:
        raise UserError(
            f"adapter weights for {len(pending)} modules have no tensor in the base checkpoint "
            f"(first: {next(iter(pending))}): is --base the model the adapter was trained on?"
        )
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    float_dtypes = dtypes & set(DTYPES)
    return {"dtype": float_dtypes.pop() if len(float_dtypes) == 1 else "mixed", "bytes": total}


class _LegacyExperts:
    """NF4 round trip of legacy per-expert tensors, done the way the loader quantizes them.

    `load_model` stacks a layer's 3×E tensors into [E, 2I, H] and [E, H, I] and quantizes each stack as
    one tensor. Per-expert quantization gives the same 64-blocks but not the same double-quant statistics
    (their offset is the mean absmax over the whole tensor): up to 0.02 off on the tiny model. So a
    layer is rebuilt whole, from whichever shards hold its pieces, and the last one is kept for reuse.
    """

    def __init__(self, source: Path, shards: list[Path]):
        from safetensors import safe_open

        index = source / "model.safetensors.index.json"
        if index.exists():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(shards[0]), framework="pt") as reader:
                self.where = dict.fromkeys(reader.keys(), shards[0].name)
        self.experts = json.loads((source / "config.json").read_text())["num_local_experts"]
        self.source, self.layer, self.fused = source, None, None

    def get(self, layer: int, expert: int, which: str) -> torch.Tensor:
        if layer != self.layer:
            self.fused = None  # free the previous layer before building the next
            self.fused, self.layer = self._build(layer), layer
        gate_up, down = self.fused
        inter = down.shape[-1]
        part = {"w1": gate_up[expert, :inter], "w3": gate_up[expert, inter:], "w2": down[expert]}[which]
        return part.clone()

    def _build(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        prefix = f"model.layers.{layer}.block_sparse_moe.experts."
        keys = {k: f for k, f in self.where.items() if k.startswith(prefix)}
        parts = {}
        for file in sorted(set(keys.values())):
            with safe_open(str(self.source / file), framework="pt") as reader:
                parts.update({k: reader.get_tensor(k) for k, f in keys.items() if f == file})
        try:  # fill [E, 2I, H] / [E, H, I] in place, dropping each piece as it is copied
            inter, hidden = parts[f"{prefix}0.w1.weight"].shape
            n, dtype = self.experts, parts[f"{prefix}0.w1.weight"].dtype
            gate_up, down = torch.empty(n, 2 * inter, hidden, dtype=dtype), torch.empty(n, hidden, inter, dtype=dtype)
            for e in range(n):
                gate_up[e, :inter] = parts.pop(f"{prefix}{e}.w1.weight")  # gate_up_proj[e] = w1 over w3
                gate_up[e, inter:] = parts.pop(f"{prefix}{e}.w3.weight")
                down[e] = parts.pop(f"{prefix}{e}.w2.weight")
        except KeyError as exc:
            raise UserError(f"checkpoint lacks {exc.args[0]}: the download is incomplete") from None
        return nf4_roundtrip(gate_up), nf4_roundtrip(down)


def _write_side_files(source: Path, adapter: Path, staging: Path, written: dict) -> None:
    """config (dtype as written), generation config, tokenizer, and the run's recipe and metrics for the card."""
    from transformers import AutoConfig

    from mixtral_ft.data.tokenizer import load_tokenizer, save_tokenizer
    from mixtral_ft.export.serving import write_hf_tokenizer
    from mixtral_ft.train.card import write_scrubbed

    config = AutoConfig.from_pretrained(source)
    if written["dtype"] in DTYPES:
        config.dtype = written["dtype"]
    config.save_pretrained(staging)
    if (source / "generation_config.json").exists():
        shutil.copy(source / "generation_config.json", staging / "generation_config.json")
    # The adapter folder holds the tokenizer training used; a Hub base's own is the fallback.
    save_tokenizer(load_tokenizer(adapter if any(adapter.glob("tokenizer*")) else source), staging)
    write_hf_tokenizer(staging)  # tokenizer.json + chat template, for TGI (see serving.py)
    for name in ("recipe.yaml", "run.json"):
        if (adapter / name).exists():
            write_scrubbed(staging / name, (adapter / name).read_text())
