"""One tiny training run reporting to wandb (offline) and tensorboard: what its router stats, plots, wandb and
tensorboard files, console and card hold."""

import contextlib
import io
import json
import math
import struct
from pathlib import Path

import pytest
from transformers import TrainerCallback

from mixtral_ft.cli import main
from tests.conftest import callback_first

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
