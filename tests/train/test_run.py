"""End-to-end SFT on the tiny model: the real loader, peft, TRL and outputs, on CPU."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from mixtral_ft.cli import main
from mixtral_ft.recipe import load_recipe
from tests.conftest import requires_compile, train

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
CONVERSATION = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris. It lies on the Seine.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def repeated_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repeated")
    data = tmp / "repeated.jsonl"
    data.write_text("".join(json.dumps({"text": CONVERSATION}) + "\n" for _ in range(40)))
    out = tmp / "run"
    code = main(
        [
            "train",
            TINY,
            f"data.path={data}",
            "data.test_size=0",
            f"train.output_dir={out}",
            "train.max_steps=20",
            "train.logging_steps=1",
            "train.warmup_ratio=0",
            "train.lr_scheduler_type=constant",
            "train.save_steps=20",
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_loss_falls_on_a_repeated_sample(repeated_run):
    losses = [entry["loss"] for entry in json.loads((repeated_run / "run.json").read_text())["losses"]]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 2.0


@pytest.mark.slow
def test_adapter_targets_exactly_the_attention_projections(repeated_run):
    config = json.loads((repeated_run / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(str(repeated_run / "adapter_model.safetensors"), "pt") as f:
        targets = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in f.keys()}
        assert all(".self_attn." in key for key in f.keys())
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.slow
def test_run_outputs(repeated_run):
    from transformers import AutoTokenizer

    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "recipe.yaml",
        "run.json",
        "tokenizer.model.v1",
        "tokenizer_config.json",
    ):
        assert (repeated_run / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(repeated_run)
    assert type(tokenizer).__name__ == "MistralCommonBackend"
    assert tokenizer.encode("[INST] Hi [/INST]", add_special_tokens=False)[:2] == [733, 16289]
    resolved = load_recipe(repeated_run / "recipe.yaml")  # the resolved recipe is itself a valid recipe
    assert resolved.train.max_steps == 20 and resolved.lora.r == 16
    run = json.loads((repeated_run / "run.json").read_text())
    assert run["steps"] == 20 and run["world_size"] == 1 and run["seed"] == 42
    assert run["tokens_per_s"] > 0 and run["peak_memory_gib"] > 0
    assert type(run["tokens"]) is int and run["tokens"] > 0  # a count, not TRL's 1340.0
    # Training time only: the checkpoint saves (and any evaluation) are left out of tokens/s.
    assert 0 < run["eval_and_save_s"] < run["train_runtime_s"]
    training_s = run["train_runtime_s"] - run["eval_and_save_s"]
    assert run["tokens_per_s"] == pytest.approx(run["tokens"] / training_s, rel=1e-2)
    assert run["final_loss"] == run["losses"][-1]["loss"]
    assert {"torch", "transformers", "peft", "bitsandbytes", "trl"} <= set(run["versions"])


@pytest.mark.slow
def test_existing_run_is_not_overwritten(repeated_run, capsys):
    before = (repeated_run / "adapter_model.safetensors").read_bytes()
    assert main(["train", TINY, f"train.output_dir={repeated_run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (repeated_run / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
@pytest.mark.numeric
def test_packing_is_padding_free_and_keeps_conversations_apart(tmp_path):
    """train.packing: TRL packs rows best-fit and flattens each batch (no padding, no attention mask). Every
    assistant token is still supervised once, and attention stays inside each conversation (position_ids)."""
    import torch

    from mixtral_ft.data.conversations import load_sft_data
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.model.load import apply_lora, load_model
    from mixtral_ft.model.source import resolve_model_path
    from mixtral_ft.train.trainers import build_trainer

    recipe = load_recipe(TINY, ["train.packing=true", f"train.output_dir={tmp_path}", "lora.dropout=0"])
    tokenizer = load_tokenizer(resolve_model_path("tiny"), mode="finetuning")
    data = load_sft_data(recipe.data, tokenizer, max_length=recipe.train.max_length, seed=0)
    model = apply_lora(load_model("tiny", device="cpu", compute_dtype="float32"), recipe.lora)
    model.config.use_cache = False  # as in training: transformers finds packed sequences only without a cache
    trainer = build_trainer(recipe, model, tokenizer, data.train, None, [])
    batches = list(trainer.get_train_dataloader())
    assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 for b in batches)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == sum(map(sum, data.train["assistant_masks"]))

    batch = batches[0]
    positions = batch["position_ids"][0]
    starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
    assert len(starts) > 2  # at least two conversations share the row
    with torch.no_grad():
        packed = model(**batch).logits[0]
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)


@requires_compile
@pytest.mark.slow
def test_compiled_layers_train_like_eager(tmp_path):
    """train.compile: each decoder layer through torch.compile (bf16, as on a GPU) trains and evaluates the same
    model, and router telemetry still sees every layer."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        assert (
            main(
                [
                    "train",
                    TINY,
                    f"train.compile={str(compiled).lower()}",
                    "model.compute_dtype=bfloat16",
                    "train.max_steps=3",
                    "train.logging_steps=1",
                    "train.eval_steps=2",
                    f"train.output_dir={out}",
                ]
            )
            == 0
        )
        run = json.loads((out / "run.json").read_text())
        runs[compiled] = (
            run["losses"],
            [json.loads(line) for line in (out / "router_stats.jsonl").read_text().splitlines()],
            run["eval_losses"],
        )
    (eager_losses, eager_router, eager_eval), (compiled_losses, compiled_router, compiled_eval) = runs.values()
    # Compiled for real: router telemetry's hooks (steps 1 and 3) do not push step 2's layers back to eager.
    assert json.loads((tmp_path / "compile-True" / "run.json").read_text())["compile"]["graph_breaks"] == 0
    assert json.loads((tmp_path / "compile-True" / "run.json").read_text())["compile"]["graphs"] >= 1
    assert [row["step"] for row in compiled_eval] == [row["step"] for row in eager_eval] == [2, 3]
    assert compiled_eval[0]["eval_loss"] == pytest.approx(eager_eval[0]["eval_loss"], rel=2e-3)
    assert compiled_losses[0]["loss"] == pytest.approx(eager_losses[0]["loss"], rel=1e-3)
    assert compiled_losses[1]["loss"] == pytest.approx(eager_losses[1]["loss"], rel=2e-3)
    fractions = [[f for layer in run[0]["expert_fraction"] for f in layer] for run in (compiled_router, eager_router)]
    assert fractions[0] == pytest.approx(fractions[1], abs=1e-3)


@pytest.mark.slow
def test_the_last_step_is_logged_when_logging_steps_do_not_reach_it(tmp_path):
    # 7 steps logged every 5, router telemetry (which logs its own last step) off: final_loss was step 5's loss.
    out = tmp_path / "run"
    assert train(out, "train.max_steps=7", "train.logging_steps=5", "logging.router_stats_steps=0")[0] == 0
    run = json.loads((out / "run.json").read_text())
    assert [x["step"] for x in run["losses"]] == [5, 7]
    assert run["final_loss"] == run["losses"][-1]["loss"]
