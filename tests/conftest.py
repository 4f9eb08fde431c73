"""Shared fixtures: a private cache for the tiny model, tiny checkpoints in both layouts, one trained adapter."""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    # Subprocesses inherit it too, so no test writes to the user's ~/.cache.
    os.environ["MIXTRAL_FT_CACHE"] = str(tmp_path_factory.mktemp("mixtral_ft_cache"))
    # datasets' Arrow caches (the sources' and our tokenized rows'): also private, so every session starts cold.
    # datasets reads the variable at import, and test modules may have imported it already: its config too.
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
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
# train.compile and --compile need F.grouped_mm (torch >= 2.10); pyproject allows torch 2.6 as transformers 5 does.
requires_compile = pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="needs torch >= 2.10")


ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(ROOT / "recipes" / "tiny.yaml")


def trained_adapter(tmp_path_factory) -> Path:
    """A 2-step tiny SFT run, trained once per session and shared by the chat, eval and notebook tests."""
    out = tmp_path_factory.getbasetemp() / "tiny_adapter_run"
    from mixtral_ft.cli import main

    if not (out / "adapter_model.safetensors").exists():
        code = main(
            [
                "train",
                TINY_RECIPE,
                f"train.output_dir={out}",
                "train.max_steps=2",
                "train.save_steps=2",
                "train.logging_steps=1",
            ]
        )
        assert code == 0
    return out


# --- helpers shared by several test files (plain functions: import them from tests.conftest) ---------------

# 6 cosine-scheduled steps with warmup and LoRA dropout 0.05; save_steps high so only stops save checkpoints.
RUN = ["data.test_size=0", "train.max_length=128", "train.max_steps=6", "train.logging_steps=1", "train.save_steps=100"]
TINY = TINY_RECIPE


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def convo(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train(out: Path, *extra: str) -> tuple[int, str]:
    from mixtral_ft.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", TINY, *RUN, f"train.output_dir={out}", *extra])
    return code, err.getvalue()


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


@contextlib.contextmanager
def callback_first(callback):
    """Training runs with `callback` ahead of its own (before the guards; carry.py's CarryState stays last)."""
    import mixtral_ft.train.callbacks

    make = mixtral_ft.train.callbacks.make_callbacks
    mixtral_ft.train.callbacks.make_callbacks = lambda recipe, out: [callback, *make(recipe, out)]
    try:
        yield
    finally:
        mixtral_ft.train.callbacks.make_callbacks = make


@contextlib.contextmanager
def signal_at(step: int | str, signum: int):
    """A real signal to this process at the end of `step` (or "end": of training), from a callback before the guards."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signum)

        def on_train_end(self, args, state, control, **kwargs):
            if step == "end":  # after the last step, just before the final save
                os.kill(os.getpid(), signum)

    with callback_first(Kill()):
        yield


def make_checkpoint(out: Path, step: int, recipe_overrides: tuple[str, ...] = ()) -> Path:
    """The files a resume reads, in the formats the HF Trainer writes them."""
    import yaml
    from safetensors.torch import save_file

    from mixtral_ft.recipe import load_recipe
    from mixtral_ft.train.checksums import write_manifest

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    save_file({"lora_A": torch.zeros(4, 8)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    recipe = load_recipe(TINY, [f"train.output_dir={out}", *recipe_overrides])
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    write_manifest(folder)  # last, as carry.CarryState does
    return folder


def other_shape_model(folder: Path) -> Path:
    """A random Mixtral twice as wide as the tiny one: a base that no tiny adapter fits."""
    from mixtral_ft.model.shapes import tiny_config
    from mixtral_ft.model.tiny import write_random_mixtral

    config = tiny_config()
    config.hidden_size *= 2
    return write_random_mixtral(folder, config)
