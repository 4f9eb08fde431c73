"""Shared fixtures: a private cache for the tiny model, tiny checkpoints in both layouts, one trained adapter."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    # Subprocesses inherit it too, so no test writes to the user's ~/.cache.
    os.environ["MIXTRAL_FT_CACHE"] = str(tmp_path_factory.mktemp("mixtral_ft_cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(private_cache):
    from mixtral_ft.model.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_fused_dir(private_cache, tmp_path_factory):
    from mixtral_ft.model.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny_fused"), layout="fused")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(ROOT / "recipes" / "tiny.yaml")


def trained_adapter(tmp_path_factory) -> Path:
    """A 2-step tiny SFT run, trained once per session and shared by the chat, eval and notebook tests."""
    out = tmp_path_factory.getbasetemp() / "tiny_adapter_run"
    from mixtral_ft.cli import main

    if not (out / "adapter_model.safetensors").exists():
        code = main(["train", TINY_RECIPE, f"train.output_dir={out}", "train.max_steps=2", "train.save_steps=2",
                     "train.logging_steps=1"])
        assert code == 0
    return out
