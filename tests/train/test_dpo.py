"""DPO training: recipe checks, reward margins on tiny, one model in memory, SFT then DPO (pairs: data/test_prefs)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixtral_ft.cli import main
from mixtral_ft.data.tokenizer import load_tokenizer
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe
from tests.data.test_prefs import GOOD, PAIR, QUESTION, load, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY_SFT = str(ROOT / "recipes" / "tiny.yaml")
TINY_DPO = str(ROOT / "recipes" / "tiny_dpo.yaml")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, mode="finetuning")


# --- recipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.method=ppo"], "train.method"),
        (["dpo.beta=0"], "dpo.beta"),
        (["dpo.loss_type=exo_pair"], "dpo.loss_type"),
        (["dpo.max_prompt_length=192"], "dpo.max_prompt_length"),
        (["train.packing=true"], "train.packing"),
        (["data.format=chatml"], "data.format"),
    ],
)
def test_dpo_recipe_errors_name_the_key(overrides, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_recipe(TINY_DPO, overrides)


# --- training ----------------------------------------------------------------------------------------


def dpo_run(out: Path, data: Path, *extra: str) -> Path:
    assert (
        main(
            [
                "train",
                TINY_DPO,
                f"data.path={data}",
                "data.test_size=0",
                f"train.output_dir={out}",
                "train.logging_steps=1",
                "train.lr_scheduler_type=constant",
                "train.warmup_ratio=0",
                "logging.router_stats_steps=0",
                *extra,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def repeated_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_repeated")
    data = write_jsonl(tmp / "pairs.jsonl", [PAIR] * 40)
    return dpo_run(
        tmp / "run",
        data,
        "train.max_steps=5",
        "train.save_steps=5",
        "train.learning_rate=2e-3",
        "train.gradient_checkpointing=false",
    )  # the chain run below keeps it on


@pytest.mark.slow
def test_chosen_rewards_end_above_rejected(repeated_run):
    run = json.loads((repeated_run / "run.json").read_text())
    first, last = run["rewards"][0], run["rewards"][-1]
    assert first["margin"] == 0.0  # step 1: the policy is the reference
    assert last["chosen"] > last["rejected"] and last["margin"] > 0.5 and last["accuracy"] == 1.0
    assert run["reward_margin"] == last["margin"] and run["reward_accuracy"] == 1.0
    assert run["method"] == "dpo" and run["steps"] == 5
    card = (repeated_run / "README.md").read_text()  # the model card says how DPO ended, not only the loss
    assert (
        f"| reward_accuracy | {run['reward_accuracy']} |" in card
        and f"| reward_margin | {run['reward_margin']} |" in card
    )


@pytest.mark.slow
def test_dpo_run_saves_the_trained_adapter_only(repeated_run):
    for name in ("adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "run.json", "tokenizer.model.v1"):
        assert (repeated_run / name).is_file(), name
    assert not list(repeated_run.rglob("ref"))  # TRL's frozen reference copy stays out of runs and checkpoints
    assert not any(".ref." in key for key in load_file(repeated_run / "adapter_model.safetensors"))
    assert load_recipe(repeated_run / "recipe.yaml").train.method == "dpo"


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the garbage collector can reach (parameters, NF4 data, stats)."""
    from torch._subclasses.fake_tensor import is_fake

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if (
            isinstance(obj, torch.Tensor) and obj.device.type != "meta" and not is_fake(obj)
        ):  # torch.compile's leftovers
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def models_alive() -> int:
    gc.collect()
    return sum(type(o).__name__ == "MixtralForCausalLM" for o in gc.get_objects())


def test_one_model_in_memory(tokenizer, tmp_path):
    from mixtral_ft.data.prefs import PAIR_COLUMNS
    from mixtral_ft.model.load import apply_lora, load_model
    from mixtral_ft.train.trainers import build_trainer

    recipe = load_recipe(TINY_DPO, [f"train.output_dir={tmp_path / 'run'}", "logging.router_stats_steps=0"])
    data = load(write_jsonl(tmp_path / "p.jsonl", [PAIR] * 4), tokenizer)
    before, models = live_tensor_bytes(), models_alive()
    model = apply_lora(load_model("tiny", compute_dtype="float32"), recipe.lora)
    model_bytes = live_tensor_bytes() - before
    trainer = build_trainer(recipe, model, tokenizer, data.train, None, [])
    assert trainer.ref_model is None and trainer.model is model
    assert set(trainer.train_dataset.column_names) == set(PAIR_COLUMNS)  # our ids, not re-tokenized by TRL
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    trained = {n: p for n, p in lora.items() if ".default." in n}
    reference = {n.replace(".default.", ".ref."): p for n, p in trained.items()}
    assert set(lora) == set(trained) | set(reference)  # the reference is one frozen copy of the adapter
    assert all(p.requires_grad and p.dtype == torch.float32 for p in trained.values())  # not cast to bf16
    assert all(not lora[n].requires_grad and torch.equal(lora[n], p) for n, p in reference.items())
    # Base weights exist once: all that the trainer added is the LoRA-sized reference adapter.
    lora_bytes = sum(p.numel() * p.element_size() for p in trained.values())
    assert live_tensor_bytes() - before <= model_bytes + lora_bytes + 64 * 2**10
    assert models_alive() == models + 1


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    conversation = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": GOOD}]}
    sft = tmp / "sft"
    assert (
        main(
            [
                "train",
                TINY_SFT,
                f"data.path={write_jsonl(tmp / 'sft.jsonl', [conversation] * 8)}",
                "data.test_size=0",
                f"train.output_dir={sft}",
                "train.max_steps=2",
                "train.save_steps=2",
                "train.max_length=64",
                "logging.router_stats_steps=0",
            ]
        )
        == 0
    )
    dpo = dpo_run(
        tmp / "dpo",
        write_jsonl(tmp / "pairs.jsonl", [PAIR] * 8),
        f"model.adapter={sft}",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.learning_rate=1e-5",
    )
    return sft, dpo


@pytest.mark.slow
def test_sft_then_dpo_continues_the_sft_adapter(chain):
    sft, dpo = chain
    before, after = load_file(sft / "adapter_model.safetensors"), load_file(dpo / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    drift = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < drift < 1e-3  # two Adam steps of 1e-5 from the SFT weights (a fresh adapter differs by ~0.1)
    assert max(t.abs().max().item() for k, t in before.items() if "lora_B" in k) > 1e-3  # SFT really trained B
    run = json.loads((dpo / "run.json").read_text())
    assert run["rewards"][0]["chosen"] == run["rewards"][0]["rejected"] == 0.0  # reference = the SFT policy
    assert json.loads((dpo / "adapter_config.json").read_text())["r"] == 16


def test_trl_private_hook_we_override_is_unchanged():
    """TokenizedDPOTrainer overrides DPOTrainer._prepare_dataset (TRL has no path for pre-tokenized pairs).
    If TRL renames it, changes its arguments or stops calling it from __init__, our rows would be re-tokenized
    or silently ignored: this fails first, naming what to re-check."""
    import inspect

    import trl
    from trl import DPOTrainer

    from mixtral_ft.train.dpo import TRL_CHECKED, TokenizedDPOTrainer

    assert trl.__version__.startswith(TRL_CHECKED + "."), f"re-check train/dpo.py against TRL {trl.__version__}"
    params = list(inspect.signature(DPOTrainer._prepare_dataset).parameters)
    assert params == ["self", "dataset", "processing_class", "args", "dataset_name"], params
    assert list(inspect.signature(TokenizedDPOTrainer._prepare_dataset).parameters) == params
    assert 'self._prepare_dataset(train_dataset, processing_class, args, "train")' in inspect.getsource(
        DPOTrainer.__init__
    )


def test_pyproject_pins_the_trl_minor_the_override_was_checked_against():
    import tomllib

    from mixtral_ft.train.dpo import TRL_CHECKED

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    trl_dep = next(d for d in deps if d.startswith("trl"))
    major, minor = TRL_CHECKED.split(".")
    assert trl_dep.replace(" ", "") == f"trl>={TRL_CHECKED},<{major}.{int(minor) + 1}", trl_dep
