"""Router telemetry, plots, wandb (offline) and tensorboard: unit tests of the statistics and hooks, then
one tiny training run whose outputs every reporting test reads."""

import contextlib
import io
import json
import math
import resource
import signal
import struct
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mixtral_ft.cli import main
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


# --- one tiny run with wandb (offline) and tensorboard ------------------------------------------------


class CardAtSave(TrainerCallback):
    """Whether output_dir held a README.md at each checkpoint save (TRL drafts one there unless told not to)."""

    seen: list[bool] = []

    def on_save(self, args, state, control, **kwargs):
        CardAtSave.seen.append((Path(args.output_dir) / "README.md").exists())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("telemetry") / "run"
    console = io.StringIO()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console), callback_first(CardAtSave()):
        code = main(
            [
                "train",
                TINY,
                f"train.output_dir={out}",
                "data.test_size=0",
                "data.max_rows=16",
                "train.max_steps=4",
                "train.logging_steps=1",
                "train.max_length=128",
                "train.save_steps=100",
                "logging.router_stats_steps=2",
                "logging.report_to=[wandb, tensorboard]",
                "logging.run_name=telemetry-test",
                "logging.project=telemetry-project",
            ]
        )
    (out.parent / "console.txt").write_text(console.getvalue())  # what the user saw, beside the run
    (out.parent / "card_at_save.json").write_text(json.dumps(CardAtSave.seen))
    assert code == 0, console.getvalue()[-2000:]
    return out


def _records(run):
    return [json.loads(line) for line in (run / "router_stats.jsonl").read_text().splitlines()]


def _log_history(run):
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())["log_history"]


@pytest.mark.slow
def test_router_stats_file(run):
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 4]  # step 1 (the baseline), every 2 steps, the last step
    for record in records:
        assert len(record["expert_fraction"]) == 2 and record["layers"] == [0, 1]  # layers x experts
        for fractions in record["expert_fraction"]:
            assert len(fractions) == 4 and abs(sum(fractions) - 1) <= 1e-4
        for key in ("entropy", "lb_loss", "load_shift", "entropy_change"):
            assert len(record[key]) == 2 and all(math.isfinite(v) for v in record[key]), key
        assert all(0 < e <= math.log(4) for e in record["entropy"])
    assert records[0]["load_shift"] == [0.0, 0.0]


@pytest.mark.slow
def test_router_counts_only_real_tokens(run):
    # TRL's num_tokens sums the attention mask: the real tokens seen so far. Each record counts one step.
    seen = {h["step"]: h["num_tokens"] for h in _log_history(run) if "num_tokens" in h and "loss" in h}
    for record in _records(run):
        assert record["tokens"] == seen[record["step"]] - seen.get(record["step"] - 1, 0)


@pytest.mark.slow
def test_log_carries_router_scalars_and_throughput(run):
    history = [h for h in _log_history(run) if "loss" in h]
    assert [h["step"] for h in history if "router/max_expert_load" in h] == [1, 2, 4]
    assert all(h["tokens_per_s"] > 0 for h in history)
    assert all(0.25 <= h["router/max_expert_load"] <= 1 for h in history if "router/max_expert_load" in h)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["router_heatmap.png", "loss_curve.png"])
def test_plots_are_images(run, name):
    import matplotlib.image

    path = run / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _wandb_records(path: Path):
    """Records of a .wandb file: a LevelDB-style log (7-byte file header; 32 KiB blocks of chunks with a
    crc32/length/type header). wandb 0.31 no longer ships a Python reader; its core is in Go."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buffer = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buffer = chunk if kind in (1, 2) else buffer + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            yield record


@pytest.mark.slow
def test_wandb_offline_run_holds_the_loss(run):
    runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in _wandb_records(runs[0])
        if r.WhichOneof("record_type") == "history"
    ]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert any("train/router/max_expert_load" in h for h in history)
    assert any("plots/router_heatmap/_type" in h for h in history)  # the images went along too
    names = [r.run.display_name for r in _wandb_records(runs[0]) if r.WhichOneof("record_type") == "run"]
    projects = [r.run.project for r in _wandb_records(runs[0]) if r.WhichOneof("record_type") == "run"]
    assert names == ["telemetry-test"] and projects == ["telemetry-project"]


@pytest.mark.slow
def test_wandb_shows_no_summary_panel_and_the_closing_line_says_how_to_upload(run):
    # wandb's history and summary panel (25 lines) is off (quiet.py); its offline upload command is ours now.
    console = (run.parent / "console.txt").read_text()
    assert "Run data is saved locally in" in console  # wandb's own lines reach this capture
    assert "Run summary" not in console and "Run history" not in console
    assert f"wandb runs offline: upload them with `wandb sync {run / 'wandb'}/offline-run-*`" in console


@pytest.mark.slow
def test_a_few_rows_show_no_dataset_bars(run):
    # TRL's own preparation of our rows (labels, truncation, masking) drew six bars for 16 rows.
    console = (run.parent / "console.txt").read_text()
    assert "Building labels" not in console and "examples/s" not in console


@pytest.mark.slow
def test_checkpoints_leave_the_card_to_the_run_s_end(run):
    # TRL's draft card at each save asked offline wandb for a URL: a warning in the middle of the progress bar.
    assert "URL not available" not in (run.parent / "console.txt").read_text()
    assert json.loads((run.parent / "card_at_save.json").read_text()) == [False]  # one save, at step 4: no draft
    assert "## Audit" in (run / "README.md").read_text()  # then ours, at the end


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_loss(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/router/max_expert_load", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


# --- throughput leaves out evaluation and saving -----------------------------------------------------------


@pytest.mark.slow
def test_tokens_per_s_leaves_out_evaluation_and_checkpoint_saves(tmp_path, monkeypatch):
    # A clock that moves only when told: 1 s a step, 100 s an evaluation batch, 1000 s a checkpoint save. Each
    # logged tokens_per_s is then its window's tokens over its steps' seconds, whatever was evaluated or saved.
    from transformers import TrainerCallback

    import mixtral_ft.train.carry
    import mixtral_ft.train.telemetry
    from tests.conftest import callback_first, train

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
