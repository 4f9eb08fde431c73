"""`mixtral-ft data` end to end: what it prints to a pipe and to a terminal, its bad input, and the cache it warms."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY, TINY_DPO = str(ROOT / "recipes" / "tiny.yaml"), str(ROOT / "recipes" / "tiny_dpo.yaml")


def cache_files() -> dict[Path, tuple[int, int]]:
    """Every file under datasets' cache (the session's private one), with its mtime and size."""
    root = Path(os.environ["HF_DATASETS_CACHE"])
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_data_warms_the_cache_train_then_reads(capsys, tiny_dir):
    """After `mixtral-ft data`, train's own data loading (tiny's tokenizer folder, METHODS' rows) opens the same
    Arrow files and writes none: a different cache key (tokenizer, settings, code) would tokenize again."""
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.recipe import load_recipe
    from mixtral_ft.train.trainers import METHODS

    overrides = ["train.max_length=77"]  # a length no other test uses: the cache starts cold for it
    before = cache_files()
    assert main(["data", TINY, *overrides, "--show", "0"]) == 0
    warmed = cache_files()
    assert set(warmed) - set(before), "the data command wrote no cache file"
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cache: "))

    recipe = load_recipe(TINY, overrides)
    data = METHODS[recipe.train.method].rows(recipe, load_tokenizer(tiny_dir, mode="finetuning"))  # as train/run.py
    read = {Path(f["filename"]) for part in (data.train, data.eval) for f in part.cache_files}
    assert read and read <= set(warmed), "train read files the data command did not write"
    assert cache_files() == warmed, "train's data loading wrote or rewrote cache files"
    assert all(str(path).startswith(printed.split(" under ")[1].split(":")[0]) for path in read)


def test_piped_output_has_no_colour_and_marks_trained_tokens(capsys):
    assert main(["data", TINY, "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("⟦") >= 2
    assert out.startswith("data: builtin:oasst_top1 [train]: ") and "summary (sft, train.max_length 256):" in out
    assert out.count("--- train row ") == 2 and "<s> [INST] " in out


def test_show_zero_prints_the_summary_alone(capsys):
    assert main(["data", TINY_DPO, "--show", "0"]) == 0
    out = capsys.readouterr().out
    assert "pairs: 43 train, 5 eval" in out and "--- train pair" not in out and "⟦" not in out


def test_json_output(capsys):
    assert main(["data", TINY_DPO, "--json", "--show", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["method"] == "dpo" and out["summary"]["train"]["pairs"] == 43
    [row] = out["rows"]
    assert row["prompt_text"].startswith("<s> [INST]") and row["chosen_ids"][-1] == 2


def run_on_a_terminal(*args: str, env: dict | None = None) -> str:
    """The real console command with stdout on a pseudo-terminal, as a user's shell runs it."""
    import pty

    leader, follower = pty.openpty()
    command = [str(Path(sys.executable).parent / "mixtral-ft"), "data", *args]
    proc = subprocess.Popen(command, stdout=follower, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    return b"".join(chunks).decode()


def test_terminal_gets_green_and_no_color_plain():
    shown = ["train.max_length=64", "--show", "1"]
    green = run_on_a_terminal(TINY, *shown)
    assert "\x1b[32m" in green and "⟦" not in green
    plain = run_on_a_terminal(TINY, *shown, env={"NO_COLOR": "1"})
    assert "\x1b" not in plain and "⟦" in plain


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "nope.yaml"], "recipe file 'nope.yaml' not found"),
        (["data", TINY, "lora.alpah=16"], "unknown key 'lora.alpah'"),
        (["data", TINY, "data.path=missing.jsonl"], "data: file 'missing.jsonl' not found"),
        (["data", TINY, "--show", "-1"], "--show -1: give how many rows to show"),
        (["data", TINY, "--shwo", "2"], "unrecognized arguments"),
        (["data", TINY, "model.name=./no-such-model"], "model './no-such-model' is neither a local folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_rows_that_are_not_conversations_stop_with_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n" for _ in range(4))
    )
    assert main(["data", TINY, f"data.path={bad}", "data.test_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data: no row of ") and err.count("\n") == 1
