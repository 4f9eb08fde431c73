"""A training run's visible output: numeric log lines, our model card in the folder, the closing line, eval curve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mixtral_ft.cli import main
from mixtral_ft.train.card import render_card
from mixtral_ft.train.outputs import number, written_files
from mixtral_ft.train.plots import plot_loss_curve

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    stdout, stderr = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    capture.setattr(sys, "stderr", stderr)
    try:  # tiny.yaml holds out data.test_size and sets no eval_steps: eval runs at each checkpoint
        code = main(
            [
                "train",
                TINY,
                f"train.output_dir={out}",
                "train.max_steps=4",
                "train.save_steps=2",
                "train.logging_steps=2",
            ]
        )
    finally:
        capture.undo()
    assert code == 0, stderr.getvalue()[-2000:]
    return out, stdout.getvalue() + stderr.getvalue()


def test_log_lines_print_numbers_not_strings(run):
    _, text = run
    logs = re.findall(r"\{'loss': [^}]*\}", text)
    assert logs and all(re.match(r"\{'loss': \d", line) for line in logs)
    assert "'loss': '" not in text and "'eval_loss': '" not in text
    assert number(11.6523) == 11.65 and number(3) == 3


def test_log_lines_keep_every_digit_of_a_long_runs_counts():
    # TRL logs num_tokens as a float: at 4 significant digits 12,345,678 tokens printed as 12350000.0.
    assert str(number(12_345_678.0)) == "12345678" and number(1234.567) == 1235.0
    assert number(float("inf")) == float("inf") and number(float("nan")) != number(float("nan"))


def test_closing_line_names_every_file_grouped(run):
    out, text = run
    closing = next(line for line in text.splitlines() if line.startswith(f"saved to {out}: "))
    for group in ("adapter:", "tokenizer:", "run:", "plots:", "telemetry:", "checkpoints:"):
        assert group in closing
    for path in out.iterdir():
        assert path.name in closing, path.name
    assert "checkpoints: checkpoint-2, checkpoint-4" in closing and "router_stats.jsonl" in closing
    assert sum(len(v) for v in written_files(out).values()) == len(list(out.iterdir()))


def test_output_folder_card_is_ours_and_what_push_uploads(run):
    out, _ = run
    card = (out / "README.md").read_text()
    assert "fine-tuned version of [None]" not in card and "/.cache/" not in card
    assert "mixtral-ft" in card and "datasets:\n- OpenAssistant/oasst_top1_2023-08-25" in card
    for section in ("## Training run", "## Data", "## Audit", "## Plots", "## Recipe"):
        assert section in card
    assert "format chatml (auto-detected)" in card and "![loss_curve](loss_curve.png)" in card
    assert "audit: ok" in card and "Eval loss at step 4" in card
    # Its usage code loads the folder by its path, which works from anywhere (its bare name, from its parent only).
    assert f'load_model("tiny"), "{out}")' in card
    assert card == render_card(out, "adapter", ref=str(out))
    # `mixtral-ft push` renders the same card, titled by the repo id and loading it
    assert (
        render_card(out, "adapter", "org/name").replace("# org/name", f"# {out.name}").replace('"org/name"', f'"{out}"')
        == card
    )


def test_card_names_the_base_model_hub_id(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model:\n  name: mistralai/Mixtral-8x7B-v0.1\n")
    assert "base_model: mistralai/Mixtral-8x7B-v0.1" in render_card(tmp_path, "adapter")


def test_card_names_every_hub_dataset_of_a_mixture(tmp_path):
    mixture = "[{path: builtin:oasst_top1, weight: 3}, {path: org/chats, weight: 1}, {path: local.jsonl, weight: 1}]"
    (tmp_path / "recipe.yaml").write_text(f"model:\n  name: tiny\ndata:\n  path: null\n  mixture: {mixture}\n")
    front_matter = render_card(tmp_path, "adapter").split("---")[1]
    assert "datasets:\n- OpenAssistant/oasst_top1_2023-08-25\n- org/chats\n" in front_matter, front_matter


@pytest.mark.parametrize("base, dataset", [("org/x--y", "data/x..y"), ("org/modèle", "orgé/données")])
def test_card_metadata_names_only_ids_the_hub_takes(tmp_path, base, dataset):
    """base_model and datasets must be Hub ids (the Hub refuses a card naming others): recipe.is_repo_id decides,
    as it does for model.name and hub.repo_id."""
    (tmp_path / "recipe.yaml").write_text(f"model:\n  name: {base}\ndata:\n  path: {dataset}\n", encoding="utf-8")
    front_matter = render_card(tmp_path, "adapter").split("---")[1]
    assert "base_model" not in front_matter and "datasets" not in front_matter, front_matter


def test_eval_loss_is_in_run_json_and_on_the_plot(run, tmp_path):
    out, _ = run
    evals = json.loads((out / "run.json").read_text())["eval_losses"]
    assert [e["step"] for e in evals] == [2, 4]
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    without = plot_loss_curve(history, tmp_path / "a.png").read_bytes()
    with_eval = plot_loss_curve(history + [{"step": 2, "eval_loss": 1.8}], tmp_path / "b.png").read_bytes()
    assert without != with_eval
