"""Shared fixtures: a private cache for the tiny model, and tiny checkpoints in both layouts."""

import os

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
    from mixtral_ft.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_fused_dir(private_cache, tmp_path_factory):
    from mixtral_ft.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny_fused"), layout="fused")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
