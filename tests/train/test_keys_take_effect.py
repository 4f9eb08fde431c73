"""Recipe keys that pass straight through to peft or TRL, each shown to change what a real tiny run does.

A key that validates but never reaches the trainer is a silent no-op (LoRA on lm_head was one: TRL's fused head
bypassed it). Each test reads the run's own record (the trainer's log history in the checkpoint, optimizer.pt, the
saved adapter) or the model the trainer holds, and compares it with one shared baseline run where it can.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixtral_ft.cli import main
from mixtral_ft.recipe import load_recipe
from mixtral_ft.train.trainers import METHODS
from tests.conftest import TINY

# One constant-rate step or two; short rows; LoRA dropout off so two runs differ only by the key under test.
BASE = [
    "data.test_size=0",
    "train.max_length=64",
    "train.logging_steps=1",
    "train.lr_scheduler_type=constant",
    "train.warmup_ratio=0",
    "lora.dropout=0",
    "logging.router_stats_steps=0",
]


def run(out: Path, steps: int, *extra: str, recipe: str = TINY) -> Path:
    args = ["train", recipe, *BASE, f"train.output_dir={out}", f"train.max_steps={steps}", f"train.save_steps={steps}"]
    assert main([*args, *extra]) == 0
    return out


def history(out: Path, steps: int) -> list[dict]:
    """The trainer's own log_history, as the HF Trainer wrote it into the last checkpoint."""
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run(tmp_path_factory.mktemp("keys") / "baseline", 2)


# --- SFT: the loss, the optimizer and the update -------------------------------------------------------------


@pytest.mark.slow
def test_max_length_and_batch_size_set_the_tokens_per_step(baseline):
    """Two oasst conversations a step, each longer than 64 tokens and cut to train.max_length."""
    assert [h["num_tokens"] for h in history(baseline, 2)] == [2 * 64, 4 * 64]


@pytest.mark.slow
def test_router_aux_loss_coef_adds_the_weighted_aux_loss(baseline, tmp_path):
    """Step 1 starts from the same adapter on the same batch: its loss is the baseline's plus coef x aux_loss."""
    out = run(tmp_path / "aux", 2, "train.router_aux_loss_coef=0.5")
    base, aux = history(baseline, 2)[0], history(out, 2)[0]
    assert "aux_loss" not in base and aux["aux_loss"] > 0  # 0 (the default) is off, not the model config's 0.02
    assert aux["loss"] == pytest.approx(base["loss"] + 0.5 * aux["aux_loss"], rel=1e-5)


@pytest.mark.slow
def test_optim_max_grad_norm_and_weight_decay_reach_the_optimizer(tmp_path):
    """Plain SGD from LoRA's B = 0: step 1 moves only B (A's gradient is zero), by lr x the clipped gradient, so the
    adapter's B weights have norm exactly learning_rate x max_grad_norm when clipping bites."""
    lr, clip = 5e-3, 1e-3
    out = run(tmp_path / "sgd", 1, "train.optim=sgd", f"train.max_grad_norm={clip}", "train.weight_decay=0.25")
    assert history(out, 1)[0]["grad_norm"] > 10 * clip  # logged before clipping
    b = [t for name, t in adapter(out).items() if "lora_B" in name]
    assert math.sqrt(sum(float(t.double().pow(2).sum()) for t in b)) == pytest.approx(lr * clip, rel=1e-3)
    groups = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)["param_groups"]
    assert {g["weight_decay"] for g in groups} <= {0.25, 0.0} and groups[0]["weight_decay"] == 0.25
    assert all("momentum" in g and "betas" not in g for g in groups)  # torch SGD, not AdamW


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """Epochs instead of steps (0.06 of ~30 steps: 2), evaluation every step, LoRA r 8 and alpha 64."""
    out = tmp_path_factory.mktemp("keys") / "variant"
    extra = ["train.max_steps=-1", "train.num_train_epochs=0.06", "data.test_size=0.1", "train.eval_steps=1"]
    return run(out, 2, *extra, "lora.alpha=64", "lora.r=8")


@pytest.mark.slow
def test_num_train_epochs_and_eval_steps_set_the_steps_and_evaluations(variant):
    run_json = json.loads((variant / "run.json").read_text())
    assert run_json["steps"] == 2  # max_steps -1: a fraction of an epoch; 1.0 (ignored) would be ~30 steps
    assert [e["step"] for e in run_json["eval_losses"]] == [1, 2]  # null would evaluate at save_steps (2) only
    assert history(variant, 2)[-1]["epoch"] == pytest.approx(0.06, abs=0.01)


@pytest.mark.slow
def test_lora_alpha_and_r_set_the_adapter_saved(baseline, variant):
    config = json.loads((variant / "adapter_config.json").read_text())
    assert (config["lora_alpha"], config["r"]) == (64, 8)
    assert json.loads((baseline / "adapter_config.json").read_text())["lora_alpha"] == 32
    assert adapter(variant)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8


@pytest.mark.slow
def test_embed_tokens_lora_trains_under_the_fused_head_and_checkpointing(tmp_path):
    """peft's embedding LoRA starts with A = 0; after one step it is not, so its gradient arrived (through TRL's
    fused LM head and non-reentrant checkpointing, which need no input grads)."""
    out = run(
        tmp_path / "embed",
        1,
        "lora.allow_other_targets=true",
        "lora.target_modules=[q_proj, embed_tokens]",
        "train.gradient_checkpointing=true",
    )
    weights = adapter(out)
    embed = {name: t for name, t in weights.items() if "embed_tokens" in name}
    assert embed, sorted(weights)
    assert all(t.abs().sum() > 0 for t in embed.values()), {n: float(t.abs().sum()) for n, t in embed.items()}


# --- the trainer as train() builds it: its model, its data, its batches --------------------------------------


def built(tmp: Path, *overrides: str, recipe: str = TINY):
    """The TRL trainer `mixtral_ft.train.run.train` would run, built by the same functions, not yet trained."""
    from transformers import set_seed

    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.train.callbacks import make_callbacks
    from mixtral_ft.train.run import check_inputs, trainable_model
    from mixtral_ft.train.trainers import build_trainer

    resolved = load_recipe(recipe, [*BASE, f"train.output_dir={tmp}", "train.max_steps=1", *overrides])
    source = check_inputs(resolved)
    set_seed(resolved.train.seed)
    tokenizer = load_tokenizer(source.local_path(), mode="finetuning")
    data = METHODS[resolved.train.method].rows(resolved, tokenizer)
    model, _ = trainable_model(resolved, source)
    return build_trainer(resolved, model, tokenizer, data.train, data.eval, make_callbacks(resolved, tmp))


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def lora_dropouts(model) -> list[float]:
    return [d.p for name, d in model.named_modules() if isinstance(d, torch.nn.Dropout) and ".lora_dropout." in name]


@pytest.mark.slow
def test_assistant_only_loss_decides_which_labels_are_ignored_and_seed_the_adapter_init(tmp_path):
    supervised, lora_a = {}, {}
    for on, seed in ((True, 42), (False, 7)):
        trainer = built(tmp_path / str(on), f"train.assistant_only_loss={str(on).lower()}", f"train.seed={seed}")
        batch = first_batch(trainer)
        real = batch["attention_mask"] == 1
        supervised[on] = (batch["labels"][real] != -100).float().mean().item()
        lora_a[on] = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).detach().clone()
    assert supervised[False] == 1.0  # every real token is supervised
    assert 0.0 < supervised[True] < 0.9  # the prompts are not
    assert not torch.equal(lora_a[True], lora_a[False])  # train.seed seeds LoRA's init


def test_assistant_only_loss_sets_what_the_data_report_counts_as_supervised():
    """The data line's supervised tokens are those the loss is on: with the mask off, every token after <s>."""
    from mixtral_ft.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None, mode="finetuning")
    for on in (True, False):
        data = METHODS["sft"].rows(load_recipe(TINY, [*BASE, f"train.assistant_only_loss={on}"]), tokenizer)
        # TRL's labels are input_ids where assistant_masks is 1, all of them without the column (test above);
        # the shifted loss never reaches the first label.
        masks = data.train["assistant_masks"] if on else [[1] * len(ids) for ids in data.train["input_ids"]]
        assert data.reports[0].supervised_tokens == sum(sum(mask[1:]) for mask in masks), on


@pytest.mark.slow
def test_lora_dropout_makes_training_forwards_differ_in_sft(tmp_path):
    trainer = built(tmp_path, "lora.dropout=0.5")
    model = trainer.model
    assert set(lora_dropouts(model)) == {0.5}
    with torch.no_grad():  # B starts at 0, which hides anything upstream of it: give the adapter an output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    batch = first_batch(trainer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.train()
    with torch.no_grad():
        a, b = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
        model.eval()
        c, d = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


@pytest.mark.slow
def test_model_batch_and_schedule_keys_reach_the_trainer(tmp_path):
    trainer = built(
        tmp_path,
        "model.compute_dtype=bfloat16",
        "model.attn_implementation=eager",
        "train.per_device_train_batch_size=3",
        "train.learning_rate=1e-3",
        "train.lr_scheduler_type=linear",
        "train.warmup_ratio=0.2",
        "lora.alpha=64",
        "lora.r=8",
    )
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 8.0 and q_proj.r["default"] == 8  # alpha / r
    base = trainer.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert base.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.bfloat16
    assert trainer.args.bf16 and not trainer.args.fp16
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}  # LoRA stays fp32
    assert base.config._attn_implementation == "eager"
    assert base.model.layers[0].self_attn.config._attn_implementation == "eager"
    assert first_batch(trainer)["input_ids"].shape[0] == 3
    # The trainer's own optimizer and scheduler over 10 steps: warmup_ratio 0.2 is 2 steps, then linear to 0.
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4])


def test_model_revision_without_a_hub_id_is_refused(tmp_path, capsys):
    """Only a Hub id has revisions: for a folder or tiny, model.revision used to be dropped without a word."""
    argv = ["train", TINY, f"train.output_dir={tmp_path / 'run'}", "model.revision=v1.0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.revision applies to a Hub id, and 'tiny' is not one: remove it"]
    for command in ("plan", "audit"):  # every command that reads model.name, not only train
        assert main([command, TINY, f"model.name={tmp_path}", "model.revision=v1.0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model.revision applies to a Hub id" in err[0], err


# --- DPO: beta and the loss reach TRL's loss and rewards -------------------------------------------------------

TINY_DPO = TINY.replace("tiny.yaml", "tiny_dpo.yaml")
DPO = ["train.max_length=64", "dpo.max_prompt_length=24", "train.learning_rate=5e-3", "train.eval_steps=100"]


@pytest.mark.slow
def test_dpo_beta_and_loss_type_reach_trls_loss_and_rewards(tmp_path):
    """IPO's step-1 loss is (1 / 2 beta)^2 (sigmoid's would be log 2), with the policy still the reference. Both
    runs take the same first Adam step (IPO's gradient at step 1 is -1/beta times the same direction), so the
    step-2 rewards, beta x the log-ratios, scale with beta."""
    logs = {}
    for beta in (0.1, 0.5):
        out = run(tmp_path / str(beta), 2, *DPO, "dpo.loss_type=ipo", f"dpo.beta={beta}", recipe=TINY_DPO)
        logs[beta] = history(out, 2)
    assert logs[0.1][0]["loss"] == pytest.approx(25.0, rel=1e-4)
    assert logs[0.5][0]["loss"] == pytest.approx(1.0, rel=1e-4)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert logs[0.1][1][key] != 0
        assert logs[0.5][1][key] == pytest.approx(5 * logs[0.1][1][key], rel=1e-2)


@pytest.mark.slow
def test_dpo_turns_lora_dropout_off_and_cuts_prompts_to_max_prompt_length(tmp_path):
    trainer = built(tmp_path, *DPO, "dpo.max_prompt_length=16", "lora.dropout=0.5", recipe=TINY_DPO)
    assert set(lora_dropouts(trainer.model)) == {0.0}  # TRL's disable_dropout, which run.note_dpo_dropout says
    # The same rows with room for 40 prompt tokens: the long prompts keep more, and only they changed.
    recipe = load_recipe(TINY_DPO, [*BASE, *DPO, f"train.output_dir={tmp_path}", "dpo.max_prompt_length=40"])
    roomy = METHODS["dpo"].rows(recipe, trainer.processing_class).train
    cut = [len(ids) for ids in trainer.train_dataset["prompt_ids"]]
    kept = [len(ids) for ids in roomy["prompt_ids"]]
    assert len(cut) == len(kept) and any(c == 16 < k for c, k in zip(cut, kept))
    assert all(c == k or c == 16 for c, k in zip(cut, kept))


def test_a_dpo_run_says_lora_dropout_does_not_apply(tmp_path, capsys):
    from mixtral_ft.train.run import note_dpo_dropout

    def noted(*overrides: str, recipe: str = TINY_DPO) -> str:
        note_dpo_dropout(load_recipe(recipe, [f"train.output_dir={tmp_path}", *overrides]))
        return capsys.readouterr().out

    assert noted("lora.dropout=0.05").startswith("note: lora.dropout 0.05 does not apply to DPO")
    assert noted("lora.dropout=0") == noted("lora.dropout=0.05", recipe=TINY) == ""
    assert noted("lora.dropout=0.05", f"model.adapter={tmp_path}") == ""  # the adapter's own settings apply
