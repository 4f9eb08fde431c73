"""Router telemetry: unit tests of the statistics and hooks, resumed records, and throughput that leaves out
evaluation and saving (the reports of one whole run: test_run_reports.py)."""

import json
import math
import resource
import signal
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe
from mixtral_ft.train.telemetry import RouterTelemetry, layer_stats, routing_sums
from tests.conftest import callback_first

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- statistics and hooks, no training run ---------------------------------------------------------


def test_padding_is_excluded_from_routing_stats():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    indices = logits.softmax(-1).topk(2, dim=-1).indices
    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    masked = routing_sums(logits, indices, mask)
    assert torch.allclose(masked, routing_sums(logits[:3], indices[:3]))  # as if padding were never there
    assert masked[-1] == 3  # real tokens
    stats = layer_stats(masked)
    assert abs(sum(stats["fraction"]) - 1) < 1e-6
    assert 0 < stats["entropy"] <= math.log(4)


def test_lb_loss_is_transformers_load_balancing_loss_for_one_layer():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(1)
    logits = torch.randn(2 * 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    indices = logits.softmax(-1).topk(2, dim=-1).indices
    expected = load_balancing_loss_func((logits,), 4, 2, attention_mask=mask)
    assert layer_stats(routing_sums(logits, indices, mask))["lb_loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the no-grad forward, on purpose
def test_hooks_count_each_training_forward_once(tmp_path, reentrant):
    """Checkpointing recomputes each layer in backward (with grad on, either way); eval forwards run without
    grad. Neither may count: the record must equal one masked pass over the batch."""
    from transformers import MixtralForCausalLM, TrainerControl, TrainerState

    from mixtral_ft.model.shapes import tiny_config

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # else reentrant checkpointing skips the layers' backward
    ids = torch.randint(3, 32000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # the second row is padding after 7 tokens
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits

    telemetry, state, control = RouterTelemetry(tmp_path, every=10), TrainerState(max_steps=10), TrainerControl()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    telemetry.on_train_begin(None, state, control, model=model)
    telemetry.on_step_begin(None, state, control)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    with torch.no_grad():  # an eval (or DPO reference) forward inside the step
        model(input_ids=ids, attention_mask=mask)
    state.global_step = 1
    telemetry.on_step_end(None, state, control)
    telemetry.on_train_end(None, state, control)

    record = json.loads((tmp_path / "router_stats.jsonl").read_text())
    assert record["step"] == 1 and record["tokens"] == 12 + 7 and control.should_log
    for layer, logits in enumerate(reference):
        indices = logits.softmax(-1).topk(2, dim=-1).indices
        expected = layer_stats(routing_sums(logits, indices, mask))
        assert record["expert_fraction"][layer] == pytest.approx(expected["fraction"], abs=1e-6)
        assert record["lb_loss"][layer] == pytest.approx(expected["lb_loss"], abs=1e-5)
    assert hooks_before == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_resumed_run_keeps_records_up_to_its_checkpoint(tmp_path):
    from transformers import MixtralForCausalLM, TrainerControl, TrainerState

    from mixtral_ft.model.shapes import tiny_config

    stats = tmp_path / "router_stats.jsonl"
    stats.write_text(
        "".join(json.dumps({"step": s, "expert_fraction": [[0.5, 0.5]], "entropy": [0.1]}) + "\n" for s in (1, 10, 20))
    )
    telemetry = RouterTelemetry(tmp_path, every=10)
    telemetry.on_train_begin(
        None, TrainerState(global_step=10), TrainerControl(), model=MixtralForCausalLM(tiny_config())
    )
    telemetry.on_train_end(None, None, None)
    assert [json.loads(line)["step"] for line in stats.read_text().splitlines()] == [1, 10]  # 20 is redone
    assert telemetry.baseline["step"] == 1


def test_resume_drops_a_record_cut_short_by_a_kill(tmp_path):
    """A kill or a full disk mid-append leaves half a line; the resume redoes that step instead of crashing."""
    from transformers import MixtralForCausalLM, TrainerControl, TrainerState

    from mixtral_ft.model.shapes import tiny_config

    stats = tmp_path / "router_stats.jsonl"
    stats.write_text(json.dumps({"step": 1, "expert_fraction": [[0.5, 0.5]]}) + '\n{"step": 10, "tok')
    telemetry = RouterTelemetry(tmp_path, every=10)
    telemetry.on_train_begin(
        None, TrainerState(global_step=6), TrainerControl(), model=MixtralForCausalLM(tiny_config())
    )
    telemetry.on_train_end(None, None, None)
    assert [json.loads(line)["step"] for line in stats.read_text().splitlines()] == [1]


def test_a_full_disk_during_the_resume_s_rewrite_keeps_the_records(tmp_path):
    """The resume rewrites router_stats.jsonl without the records past its checkpoint; a write that fails (here
    RLIMIT_FSIZE, as a full disk) must leave the old file whole, not truncated."""
    from transformers import MixtralForCausalLM, TrainerControl, TrainerState

    from mixtral_ft.model.shapes import tiny_config

    stats = tmp_path / "router_stats.jsonl"
    stats.write_text("".join(json.dumps({"step": s, "expert_fraction": [[0.5, 0.5]] * 8}) + "\n" for s in (1, 10, 20)))
    before = stats.read_bytes()
    telemetry = RouterTelemetry(tmp_path, every=10)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4, hard))
    try:
        with pytest.raises(OSError):
            telemetry.on_train_begin(
                None, TrainerState(global_step=10), TrainerControl(), model=MixtralForCausalLM(tiny_config())
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        signal.signal(signal.SIGXFSZ, previous)
        telemetry.on_train_end(None, None, None)
    assert stats.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["router_stats.jsonl"]


def test_logging_section_is_checked():
    recipe = load_recipe(TINY)
    assert recipe.logging.report_to == ("none",) and recipe.logging.router_stats_steps == 10
    assert recipe.train.router_aux_loss_coef == 0.0
    assert load_recipe(TINY, ["logging.report_to=[wandb, tensorboard]"]).logging.report_to == ("wandb", "tensorboard")
    for bad, key in (
        ("logging.report_to=[mlflow]", "logging.report_to"),
        ("logging.report_to=[none, wandb]", "logging.report_to"),
        ("logging.router_stats_steps=-1", "logging.router_stats_steps"),
        ("train.router_aux_loss_coef=-0.1", "train.router_aux_loss_coef"),
    ):
        with pytest.raises(UserError, match=key):
            load_recipe(TINY, [bad])


# --- throughput leaves out evaluation and saving -----------------------------------------------------------


@pytest.mark.slow
def test_tokens_per_s_leaves_out_evaluation_and_checkpoint_saves(tmp_path, monkeypatch):
    # A clock that moves only when told: 1 s a step, 100 s an evaluation batch, 1000 s a checkpoint save. Each
    # logged tokens_per_s is then its window's tokens over its steps' seconds, whatever was evaluated or saved.

    import mixtral_ft.train.carry
    import mixtral_ft.train.telemetry
    from tests.conftest import train

    clock = [0.0]
    for module in (mixtral_ft.train.telemetry, mixtral_ft.train.carry):
        monkeypatch.setattr(module, "perf_counter", lambda: clock[0])

    class Tick(TrainerCallback):  # ahead of carry.py's CarryState, which comes last
        def on_step_end(self, args, state, control, **kwargs):
            clock[0] += 1

        def on_prediction_step(self, args, state, control, **kwargs):
            clock[0] += 100

        def on_save(self, args, state, control, **kwargs):
            clock[0] += 1000

    out = tmp_path / "run"
    steps = ["data.test_size=0.1", "train.eval_steps=2", "train.save_steps=3"]
    with callback_first(Tick()):
        assert train(out, *steps)[0] == 0
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    tokens = {h["step"]: h["num_tokens"] for h in history if "loss" in h}
    rates = {h["step"]: h["tokens_per_s"] for h in history if "loss" in h}
    assert any("eval_loss" in h for h in history)
    assert rates == {step: tokens[step] - tokens.get(step - 1, 0) for step in tokens}  # one step a window: 1 s
    run = json.loads((out / "run.json").read_text())
    evals = sum(1 for h in history if "eval_loss" in h)
    assert run["eval_and_save_s"] >= 2 * 1000 + evals * 100  # saves at steps 3 and 6, each evaluation's batches
