"""Every shipped accelerate config loads through accelerate's own classes and says what it is for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
EXPECTED = {  # file: (distributed_type, num_machines)
    "single_gpu.yaml": (DistributedType.NO, 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 1),
    "fsdp_qlora.yaml": (DistributedType.FSDP, 1),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 1),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 2),
}


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))])


def test_the_shipped_set():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_is_what_it_says(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert ClusterConfig.from_yaml_file(str(path)).to_dict() == config.to_dict()
    kind, machines = EXPECTED[name]
    assert config.distributed_type == kind and config.num_machines == machines
    assert config.use_cpu is False and config.mixed_precision == "bf16"
    # num_processes counts every process on every node: one per GPU, whole nodes.
    assert config.num_processes >= 1 and config.num_processes % machines == 0
    assert (config.num_processes == 1) == (kind == DistributedType.NO)
    if machines > 1:
        assert config.main_process_ip and config.main_process_port and config.machine_rank == 0
    # accelerate's own launcher accepts it.
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "mixtral_ft.train", "r.yaml"])
    assert args.module and args.training_script == "mixtral_ft.train"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_says_when_how_and_how_much(name):
    text = header(CONFIGS / name)
    assert text.startswith(f"# {name}:")
    assert "When:" in text and "GiB" in text and "Memory per GPU" in text
    assert f"accelerate_configs/{name}" in text and "mixtral_ft.train" in text
    if name != "multi_node.yaml":
        assert "mixtral-ft train" in text  # our CLI line, besides accelerate's
    else:
        assert "--machine_rank" in text and "torchrun" in text


def test_fsdp_shards_packed_weights_as_bfloat16():
    config = load_config_from_file(str(CONFIGS / "fsdp_qlora.yaml"))
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 1  # PEFT's wrap policy (which the HF Trainer installs) is FSDP1's
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "MixtralDecoderLayer"
    assert fsdp["fsdp_reshard_after_forward"] == "FULL_SHARD" and fsdp["fsdp_offload_params"] is False
    assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert "ignored_modules" not in yaml.safe_load((CONFIGS / "fsdp_qlora.yaml").read_text())["fsdp_config"]
    text = header(CONFIGS / "fsdp_qlora.yaml")
    # The header documents the storage dtype, what sets it, and the decision to shard the experts.
    for needle in (
        "ACCELERATE_USE_FSDP",
        "MIXTRAL_FT_QUANT_STORAGE",
        "bfloat16",
        "compute_dtype",
        "Experts are SHARDED",
        "#1092",
        "#1854",
    ):
        assert needle in text


def test_fsdp_storage_dtype_follows_the_environment(monkeypatch):
    import torch

    from mixtral_ft.errors import UserError
    from mixtral_ft.model.quant import quant_storage_dtype

    monkeypatch.delenv("MIXTRAL_FT_QUANT_STORAGE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert quant_storage_dtype() == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate exports for an FSDP config
    assert quant_storage_dtype() == torch.bfloat16
    monkeypatch.setenv("MIXTRAL_FT_QUANT_STORAGE", "uint8")
    assert quant_storage_dtype() == torch.uint8
    monkeypatch.setenv("MIXTRAL_FT_QUANT_STORAGE", "int4")
    with pytest.raises(UserError, match="MIXTRAL_FT_QUANT_STORAGE"):
        quant_storage_dtype()


def test_zero3_makes_the_moe_block_a_leaf():
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml"))
    ds = config.deepspeed_config
    assert ds["zero_stage"] == 3 and ds["deepspeed_moe_layer_cls_names"] == "MixtralSparseMoeBlock"
    text = header(CONFIGS / "deepspeed_zero3.yaml")
    assert "#4808" in text and "leaf" in text and "MIXTRAL_FT_QUANT_STORAGE=bfloat16" in text
    # The class accelerate looks up by name exists in the installed transformers.
    from transformers.models.mixtral import modeling_mixtral

    assert hasattr(modeling_mixtral, ds["deepspeed_moe_layer_cls_names"])
