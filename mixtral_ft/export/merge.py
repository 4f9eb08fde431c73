"""`mixtral-ft merge`: fold a QLoRA adapter into the base weights, one checkpoint shard at a time.

The adapter was trained against NF4-dequantized weights, not the checkpoint's bf16 ones, so merging
into the bf16 weights gives a model that is not the one that was trained (peft #2105, #1080;
transformers #31293). The default, `base_weights="dequantized"`, writes W' = dequant(NF4(W)) + scale·B·A
for the adapted projections and replaces every other weight that `load_model` quantizes (attention, and
the experts unless the run kept them bf16) by its NF4 round trip: the merged model computes what
adapter-on-NF4-base computed in training. `"original"` merges into the checkpoint's weights as they are.

Output keeps the source's tensor names, layout (legacy per-expert or fused) and shard files, so plain
`AutoModelForCausalLM.from_pretrained(out)` loads it. Peak host memory is one shard plus one layer of
experts (the NF4 round trip must see a whole layer, see roundtrip.py's `LegacyExperts`) plus the adapter.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from mixtral_ft.common import say
from mixtral_ft.errors import UserError
from mixtral_ft.export.lora_weights import read_lora
from mixtral_ft.export.roundtrip import LegacyExperts, nf4_roundtrip
from mixtral_ft.model.quant import DTYPES
from mixtral_ft.train.checksums import file_digest

ATTENTION_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$")
FUSED_EXPERT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
BASE_WEIGHTS = ("dequantized", "original")


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
    from mixtral_ft.export.staging import staged_folder
    from mixtral_ft.train.card import write_card, write_scrubbed

    adapter, out = Path(adapter_dir), Path(out)
    _check_request(adapter, out, base_weights, verify, device)
    base_name, source, model_cfg = _resolve_base(adapter, base)
    quantize_experts = bool(model_cfg.get("quantize_experts", True))
    lora = read_lora(adapter)

    with staged_folder(out, "--out") as staging:  # an interrupted merge leaves no half-written model
        say("merge", f"{len(lora)} LoRA weights from {adapter} into {base_name} ({base_weights} base weights)")
        written = _merge_shards(
            source, staging, lora, base_weights == "dequantized", quantize_experts, DTYPES.get(dtype)
        )
        _write_side_files(source, adapter, staging, written)
        # `base` as the user knows it (hub id, `tiny`), not the cache folder it resolved to: the card shows it.
        shown = base or model_cfg.get("name") or base_name
        info = _merge_record(adapter, shown, source, base_weights, quantize_experts, written["dtype"], len(lora))
        write_scrubbed(staging / "merge.json", json.dumps(info, indent=2) + "\n")
        if verify:
            info["verify"] = _verify(staging, adapter, source, info, device)
        write_card(staging, "model", title=out.name, ref=str(out))
    return info


def merged_in(model: Path, adapter: Path) -> bool:
    """Whether `model` is a merged folder whose merge.json names these very adapter weights."""
    try:
        info = json.loads((model / "merge.json").read_text())
        return info["adapter_sha256"] == file_digest(adapter / "adapter_model.safetensors")
    except (OSError, ValueError, KeyError, TypeError):  # not merged, merged before the hash was kept, no weights
        return False


def refuse_merged_twice(model: Path, adapter: Path, model_name: str, adapter_name: str) -> None:
    """chat and eval: an adapter put on the merged folder that already holds it would be applied twice, silently."""
    if merged_in(model, adapter):
        raise UserError(
            f"'{model_name}' already has adapter '{adapter_name}' merged in (its merge.json): drop --adapter"
        )


def _check_request(adapter: Path, out: Path, base_weights: str, verify: bool, device: str | None) -> None:
    """The flags and folders that can be refused before anything is read."""
    from mixtral_ft.export.staging import refuse_nonempty
    from mixtral_ft.model.device import check_device

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
    elif device is not None:  # the merge itself streams shards on the CPU: without --verify it would do nothing
        raise UserError(f"--device {device} applies to --verify only (merging runs on CPU): add --verify or drop it")


def _resolve_base(adapter: Path, base: str | None) -> tuple[str, Path, dict]:
    """(base name, its local checkpoint folder, the adapter's recorded model settings); `base` overrides the record."""
    from mixtral_ft.model.load import adapter_base
    from mixtral_ft.model.loader import read_manifest
    from mixtral_ft.model.source import resolve_model_path

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
    return base_name, source, model_cfg


def _merge_shards(
    source: Path, staging: Path, lora: dict, dequantized: bool, quantize_experts: bool, out_dtype: torch.dtype | None
) -> dict:
    """Read, transform and write each source shard in turn; returns what was written."""
    from safetensors.torch import save_file

    from mixtral_ft.model.loader import checkpoint_shards

    shards = checkpoint_shards(source)
    experts = LegacyExperts(source, shards)
    pending = dict(lora)
    roundtrip = (dequantized, dequantized and quantize_experts)  # (attention, experts), as `_base_value` takes them
    weight_map, total, dtypes = {}, 0, set()
    for number, shard in enumerate(shards, 1):
        say("merge", f"shard {number}/{len(shards)} ({shard.name})")
        tensors = _merged_shard(shard, experts, pending, roundtrip, out_dtype)
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in tensors.values())
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


def _merged_shard(
    shard: Path, experts: LegacyExperts, pending: dict, roundtrip: tuple[bool, bool], out_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One shard's tensors as written: the base weights training saw, plus the deltas it pops from `pending`."""
    from safetensors import safe_open

    from mixtral_ft.model.loader import LEGACY_ROUTER

    tensors = {}
    with safe_open(str(shard), framework="pt", device="cpu") as reader:
        for key in reader.keys():
            tensor = reader.get_tensor(key)
            value = _base_value(key, tensor, experts, *roundtrip)
            delta = pending.pop(LEGACY_ROUTER.sub(r"\1.mlp.gate.weight", key), None)
            if delta is not None:
                value = _add_delta(key, value, *delta)
            target = out_dtype or tensor.dtype
            tensors[key] = value.to(target if value.is_floating_point() else value.dtype).contiguous()
    return tensors


def _base_value(
    key: str, tensor: torch.Tensor, experts: LegacyExperts, roundtrip_attention: bool, roundtrip_experts: bool
) -> torch.Tensor:
    """`tensor`, or its NF4 round trip where `load_model` quantizes it and the merge asked for that."""
    from mixtral_ft.model.loader import LEGACY_EXPERT

    legacy = LEGACY_EXPERT.match(key)
    if (roundtrip_attention and ATTENTION_KEY.match(key)) or (roundtrip_experts and FUSED_EXPERT_KEY.match(key)):
        return nf4_roundtrip(tensor)
    if roundtrip_experts and legacy:
        return experts.get(int(legacy[1]), int(legacy[2]), legacy[3])
    return tensor  # untouched: in the source dtype it is copied bit for bit


def _add_delta(key: str, value: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """value + scale·B·A, once the shapes show the adapter belongs to this base."""
    if (b.shape[0], a.shape[1]) != tuple(value.shape):
        raise UserError(
            f"adapter weight for {key} is {b.shape[0]}x{a.shape[1]} but the base's is "
            f"{'x'.join(map(str, value.shape))}: pass the base the adapter was trained on (--base)"
        )
    return value.float() + scale * (b @ a)  # in fp32, then one rounding to the output dtype


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


def _merge_record(
    adapter: Path, shown: str, source: Path, base_weights: str, quantize_experts: bool, dtype: str, lora_tensors: int
) -> dict:
    """merge.json: what went into the merged folder; `merged_in` matches its adapter hash."""
    return {
        "format": "mixtral_ft-merged",
        "version": 1,
        "adapter": str(adapter),
        "adapter_sha256": file_digest(adapter / "adapter_model.safetensors"),
        "base": shown,
        "base_path": str(source),
        "base_weights": base_weights,
        "quantize_experts": quantize_experts,
        "dtype": dtype,
        "lora_tensors": lora_tensors,
    }


def _verify(staging: Path, adapter: Path, source: Path, record: dict, device: str | None) -> dict:
    """`verify_merge` on the staged folder (as merge.json `record` describes it), its report kept as verify.json."""
    from mixtral_ft.export.verify import verify_merge
    from mixtral_ft.train.card import write_scrubbed

    report = verify_merge(
        staging,
        adapter,
        source,
        quantize_experts=record["quantize_experts"],
        device=device,
        weights_dtype=record["dtype"],
        base_weights=record["base_weights"],
    )
    write_scrubbed(staging / "verify.json", json.dumps(report, indent=2) + "\n")
    return report
