"""Worker scripts for tests/test_distributed.py, run under torchrun on CPU (gloo), one per rank.

python -m torch.distributed.run --nproc-per-node 2 tests/distributed_helpers.py dump OUT RECIPE [k=v ...]
    trains through the real `mixtral-ft train` path; each rank writes its LoRA weights after the
    last step to OUT/rank{R}.safetensors (and rank 0 the initial ones to OUT/init.safetensors). Rank 1
    also holds BALLAST_MIB of memory for a moment after step 1 (so its peak is the run's highest, not
    rank 0's) and writes its peak then, in GiB, to OUT/rank1_peak.json.
python -m torch.distributed.run --nproc-per-node 2 tests/distributed_helpers.py fsdp OUT CONFIG
    wraps the tiny NF4 model in FSDP the way accelerate + the HF Trainer do for CONFIG (accelerate
    itself enables FSDP only on GPUs), trains one step, and writes OUT/fsdp_rank{R}.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

BALLAST_MIB = 1024  # about the tiny run's whole footprint (0.7-1 GiB on CPU), so rank 1 peaks highest


def lora_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def dump(out: Path, argv: list[str]) -> int:
    """`mixtral-ft train` with one extra callback; the callback list is the supported extension point."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    import mixtral_ft.train.callbacks
    from mixtral_ft.cli import main
    from mixtral_ft.common import peak_gib

    rank = int(os.environ["RANK"])

    class DumpLora(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if rank == 0:
                save_file(lora_state(model), str(out / "init.safetensors"))

        def on_step_end(self, args, state, control, **kwargs):
            if rank == 1 and state.global_step == 1:
                ballast = torch.ones(BALLAST_MIB * 2**18, device=args.device)  # float32, every page written
                del ballast
                (out / "rank1_peak.json").write_text(json.dumps(peak_gib(args.device)))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            save_file(lora_state(model), str(out / f"rank{rank}.safetensors"))
            print(f"rank {rank} of {os.environ['WORLD_SIZE']} trained {state.global_step} steps", flush=True)

    make = mixtral_ft.train.callbacks.make_callbacks
    mixtral_ft.train.callbacks.make_callbacks = lambda recipe, output_dir: [*make(recipe, output_dir), DumpLora()]
    return main(["train", *argv])


def fsdp(out: Path, config_file: str) -> int:
    """One FSDP training step of the tiny model, with CONFIG's FSDP settings, on gloo."""
    import torch.distributed as dist
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.distributed.fsdp import update_fsdp_plugin_peft

    from mixtral_ft.distributed import prepare_for_distributed
    from mixtral_ft.model.load import apply_lora, load_model
    from mixtral_ft.model.quant import NF4Experts
    from mixtral_ft.recipe import load_recipe

    config = load_config_from_file(config_file)
    cfg = config.fsdp_config
    # What `accelerate launch` exports to FSDP workers (see accelerate.utils.launch.prepare_multi_gpu_env).
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = cfg["fsdp_transformer_layer_cls_to_wrap"]
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    torch.manual_seed(0)
    recipe = load_recipe("recipes/tiny.yaml")
    model = load_model("tiny", compute_dtype="bfloat16", device="cpu")
    model = prepare_for_distributed(apply_lora(model, recipe.lora))
    for p in model.parameters():  # TRL's SFTTrainer keeps QLoRA adapters in bf16
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    experts = model.get_base_model().model.layers[0].mlp.experts
    storage = str(experts.gate_up_proj.dtype)
    packed_numel = sum(
        m.gate_up_proj.numel() + m.down_proj.numel() for m in model.modules() if isinstance(m, NF4Experts)
    )
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        # FSDP's bf16 mixed precision also casts buffers (the rotary frequencies): do the same unsharded.
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        for b in model.buffers():
            b.data = b.data.to(torch.bfloat16 if config.mixed_precision == "bf16" else b.dtype)
        reference = model(input_ids=ids, labels=ids).loss.item()
        for n, b in model.named_buffers():
            b.data = buffers[n]
    full_numel = sum(p.numel() for p in model.parameters())  # every rank holds all of it before wrapping

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=cfg["fsdp_version"],
        reshard_after_forward=cfg["fsdp_reshard_after_forward"],
        backward_prefetch=cfg["fsdp_backward_prefetch"],
        forward_prefetch=cfg["fsdp_forward_prefetch"],
        use_orig_params=cfg["fsdp_use_orig_params"],
        sync_module_states=cfg["fsdp_sync_module_states"],
        cpu_ram_efficient_loading=cfg["fsdp_cpu_ram_efficient_loading"],
        state_dict_type=cfg["fsdp_state_dict_type"],
        auto_wrap_policy=cfg["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[cfg["fsdp_transformer_layer_cls_to_wrap"]],
        mixed_precision_policy=config.mixed_precision,
    )
    update_fsdp_plugin_peft(model, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))  # as the Trainer
    plugin.set_auto_wrap_policy(model)  # as Accelerator.prepare_model, with its FSDP1 arguments
    wrapped = FSDP(
        model,
        sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        sync_module_states=plugin.sync_module_states,
        backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch,
        use_orig_params=plugin.use_orig_params,
        limit_all_gathers=plugin.limit_all_gathers,
        device_id=torch.device("cpu"),
    )
    local_numel = sum(p.numel() for p in wrapped.parameters())  # this rank's shards of every flat parameter
    # The flat parameters holding NF4 experts (FSDP1 internals, test only): [local numel, unsharded numel].
    expert_units = [
        [u._flat_param.numel(), u._flat_param._unpadded_unsharded_size.numel()]
        for u in FSDP.fsdp_modules(wrapped)
        if u._flat_param is not None and any(".experts." in f for f in u._flat_param._fqns)
    ]

    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = wrapped(input_ids=ids, labels=ids).loss.item()
    # accelerate's get_state_dict for FSDP1 FULL_STATE_DICT: exercises the NF4 modules' state_dict under FSDP.
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False)):
        state = wrapped.state_dict()
    lora = {k: v.float().sum().item() for k, v in state.items() if "lora_" in k}
    nf4_stats = sorted(k for k in state if k.endswith("gate_up_proj.absmax"))
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "storage": storage,
        "reference_loss": reference,
        "fsdp_loss": loss.item(),
        "loss_after_step": after,
        "local_numel": local_numel,
        "full_numel": full_numel,
        "packed_expert_numel": packed_numel,
        "expert_units": expert_units,
        "lora_sums": lora,
        "expert_stats_in_state_dict": nf4_stats,
        "mixed_precision": str(plugin.mixed_precision_policy),
    }
    (out / f"fsdp_rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    mode, out_dir, *rest = sys.argv[1:]
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    sys.exit(dump(target, rest) if mode == "dump" else fsdp(target, rest[0]))
