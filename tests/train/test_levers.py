"""Training's speed levers (train.reuse_dequantized, train.skip_checkpoint_layers, train.liger) on the tiny model.

The real stack on CPU: the same numbers as the default run, and proof that each lever acted during training (the
NF4 expert weights dequantized per step, counted at quant.dequantize_nf4), first on one step of the bare model.
liger needs Triton on a CUDA GPU, so only its refusals are checked here.
"""

import contextlib
import importlib.util
import io
import json

import pytest
import torch

from mixtral_ft.bench import steps
from mixtral_ft.bench import throughput as bench
from mixtral_ft.cli import main
from mixtral_ft.errors import UserError
from mixtral_ft.model import quant
from mixtral_ft.model.shapes import tiny_config
from tests.conftest import RUN, TINY, adapter_bytes, train

STEPS = ["train.max_steps=2", "logging.router_stats_steps=0"]
# tiny: 2 layers x 2 expert weights, each dequantized in forward, recompute and backward: 12 per step
ACCUMULATE = "train.gradient_accumulation_steps=2"
PER_STEP = {"default": 12, "reuse": 8, "skip": 10, "no_checkpointing": 8}


def counting(monkeypatch) -> list:
    """A list that grows by one at each dequantization of an NF4 expert weight."""
    calls, real = [], quant.dequantize_nf4
    monkeypatch.setattr(quant, "dequantize_nf4", lambda param: calls.append(1) or real(param))
    return calls


def counted_run(monkeypatch, out, *extra):
    """A 2-step tiny SFT run; its losses, and how many times NF4 expert weights were dequantized per step."""
    calls = counting(monkeypatch)
    code, err = train(out, *STEPS, *extra)
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 2
    return [entry["loss"] for entry in run["losses"]], len(calls) / 2


# --- the levers on the model alone: one forward and backward, gradients compared exactly ----------------


def grads_and_dequant_count(monkeypatch, *, checkpointing, skip_layers=0, reuse=False):
    calls = counting(monkeypatch)
    model = bench.build_random_nf4(tiny_config(), torch.device("cpu"), torch.float32)
    if checkpointing:
        steps.enable_checkpointing(model, skip_layers)
    quant.configure_experts(model, reuse_dequantized=reuse)
    model = steps.add_lora(model)
    model.train()
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    calls.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    reused = [m.reuse_dequantized for m in model.modules() if isinstance(m, quant.NF4Experts)]
    return grads, len(calls), reused


def test_reusing_the_recompute_dequantization_saves_a_third_and_keeps_gradients(monkeypatch):
    base, base_calls, _ = grads_and_dequant_count(monkeypatch, checkpointing=True)
    reused, reused_calls, flags = grads_and_dequant_count(monkeypatch, checkpointing=True, reuse=True)
    # 2 layers x 2 expert weights: forward, recompute, backward = 12; reusing drops the backward's 4
    assert (base_calls, reused_calls) == (12, 8) and flags == [True, True]
    for name, grad in base.items():
        torch.testing.assert_close(reused[name], grad, rtol=0, atol=0)


def test_reuse_stays_off_where_a_layer_is_not_checkpointed(monkeypatch):
    _, calls, flags = grads_and_dequant_count(monkeypatch, checkpointing=False, reuse=True)
    assert flags == [False, False] and calls == 8  # forward + backward: nothing kept across layers
    _, calls, flags = grads_and_dequant_count(monkeypatch, checkpointing=True, skip_layers=1, reuse=True)
    assert flags == [True, False] and calls == 8  # layer 0: fwd, recompute; layer 1: fwd, bwd


def test_skipping_checkpoint_layers_changes_no_gradient(monkeypatch):
    full, full_calls, _ = grads_and_dequant_count(monkeypatch, checkpointing=True)
    partial, partial_calls, _ = grads_and_dequant_count(monkeypatch, checkpointing=True, skip_layers=1)
    assert partial_calls == full_calls - 2  # the last layer is not recomputed
    for name, grad in full.items():
        torch.testing.assert_close(partial[name], grad)


# --- the levers in training runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        out = tmp_path_factory.mktemp("levers") / "default"
        return (*counted_run(monkeypatch, out), out)


def test_reusing_dequantized_experts_trains_bitwise_the_same(default_run, monkeypatch, tmp_path):
    losses, per_step, out = default_run
    reused, reused_per_step = counted_run(monkeypatch, tmp_path / "reuse", "train.reuse_dequantized=true")
    # Took effect in training: the backward's dequantizations are gone on every layer, every step.
    assert (per_step, reused_per_step) == (PER_STEP["default"], PER_STEP["reuse"])
    assert reused == losses
    assert adapter_bytes(tmp_path / "reuse") == adapter_bytes(out)  # the same gradients, bit for bit


def test_skipping_the_last_layer_keeps_its_activations_and_the_losses(default_run, monkeypatch, tmp_path):
    losses, per_step, _ = default_run
    skipped, skipped_per_step = counted_run(monkeypatch, tmp_path / "skip", "train.skip_checkpoint_layers=1")
    assert skipped_per_step == PER_STEP["skip"]  # the last layer is not recomputed: 2 fewer per step
    assert skipped == pytest.approx(losses, rel=1e-6)


def test_gradient_checkpointing_off_recomputes_no_layer(default_run, monkeypatch, tmp_path):
    losses, per_step, _ = default_run
    plain, plain_per_step = counted_run(monkeypatch, tmp_path / "plain", "train.gradient_checkpointing=false")
    assert (per_step, plain_per_step) == (PER_STEP["default"], PER_STEP["no_checkpointing"])  # forward + backward
    assert plain == pytest.approx(losses, rel=1e-6)


def test_both_levers_together_reuse_only_where_layers_recompute(monkeypatch, tmp_path):
    _, per_step = counted_run(
        monkeypatch, tmp_path / "both", "train.skip_checkpoint_layers=1", "train.reuse_dequantized=true"
    )
    assert per_step == 8  # layer 0: forward + recompute (reused in backward); layer 1: forward + backward


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.reuse_dequantized=true", "train.gradient_checkpointing=false"],
            "'train.reuse_dequantized' acts on checkpointed layers only: set train.gradient_checkpointing=true",
        ),
        (
            ["train.skip_checkpoint_layers=1", "train.gradient_checkpointing=false"],
            "'train.skip_checkpoint_layers' acts on checkpointed layers only: set train.gradient_checkpointing=true",
        ),
        (["train.skip_checkpoint_layers=-1"], "'train.skip_checkpoint_layers' must be >= 0"),
        (["train.skip_checkpoint_layers=3"], "'train.skip_checkpoint_layers' is 3 but tiny has 2 decoder layers"),
        (["train.liger=true"], "train.liger needs a CUDA GPU"),
    ],
)
def test_a_lever_that_cannot_apply_stops_before_training_with_one_line(tmp_path, overrides, message):
    if "liger" in message and torch.cuda.is_available():
        pytest.skip("the CPU refusal")
    out = tmp_path / "run"
    code, err = train(out, *overrides)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "run.json").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_without_its_package_names_the_install(monkeypatch):
    from mixtral_ft.model.source import model_source
    from mixtral_ft.recipe import load_recipe
    from mixtral_ft.train import levers

    monkeypatch.setattr(levers.torch.cuda, "is_available", lambda: True)  # past the CUDA check, to the package
    recipe = load_recipe(TINY, ["train.liger=true"])
    with pytest.raises(UserError, match="pip install liger-kernel"):
        levers.check_levers(recipe, model_source("tiny"))


def test_dpo_keeps_the_skipped_layer_after_its_reference_passes(monkeypatch, tmp_path):
    """TRL's DPO reference pass turns checkpointing off and on again (every layer back on) in every micro-batch."""
    dpo = TINY.replace("tiny.yaml", "tiny_dpo.yaml")
    counts = {}
    for name, extra in (("default", []), ("skip", ["train.skip_checkpoint_layers=1"])):
        calls = counting(monkeypatch)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", dpo, *RUN, f"train.output_dir={tmp_path / name}", *STEPS, *extra, ACCUMULATE])
        monkeypatch.undo()
        assert code == 0, err.getvalue()
        counts[name] = len(calls) / 4  # 2 steps x 2 micro-batches
    # per micro-batch: the policy's 12 and the reference's forward (4); the skipped layer saves its recompute (2)
    assert counts == {"default": 16, "skip": 14}
