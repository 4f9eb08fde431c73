"""Issue 16, cases 3, 4, 12 (train) and 13: the output folder is locked, replaced only once a run can start, not
left empty by a failed run; input errors come before torch loads; an oversized row is refused while reading."""

import json
import subprocess
import sys
from pathlib import Path

from mixtral_ft.cli import main
from mixtral_ft.train.outdir import LOCK, lock, unlock
from tests.conftest import convo, jsonl, make_checkpoint, snapshot

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def test_overwrite_keeps_the_previous_run_when_the_new_one_fails_on_its_data(tmp_path, capsys):
    # Case 3: rows with an unknown role fail only once the tokenizer reads them, well after the output-dir checks.
    out = tmp_path / "out"
    make_checkpoint(out, 2)
    (out / "run.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"old adapter")
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(*[convo(("wizard", "Hi"), ("assistant", "Yo"))] * 5))
    before = snapshot(tmp_path)
    code = main(
        [
            "train",
            TINY,
            f"train.output_dir={out}",
            "train.overwrite=true",
            f"data.path={data}",
            "data.test_size=0",
        ]
    )
    assert code == 2 and "unknown role 'wizard'" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # checkpoints, run.json and adapter all still there; no .lock left


def test_a_second_run_into_a_locked_folder_exits_2_naming_the_holder(tmp_path, capsys):
    # Case 4: another process holds the folder; its lock dies with it.
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from mixtral_ft.train.outdir import lock; lock(Path(sys.argv[1])); print('locked', "
            "flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["train", TINY, f"train.output_dir={out}", "train.max_steps=2"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"error: train.output_dir '{out}' is in use by another run (PID {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    lock(out)  # the holder was killed (-9): its lock went with it, no stale marker to clear
    assert (out / LOCK).read_text().strip() != str(holder.pid)
    unlock(out)
    assert not (out / LOCK).exists()


def test_a_failed_run_removes_the_output_dir_it_created(tmp_path, capsys):
    # Case 12 (train): the folder (and its new parents) did not exist before the run, and nothing was written.
    out = tmp_path / "new" / "out"
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(*[convo(("wizard", "Hi"), ("assistant", "Yo"))] * 5))
    assert main(["train", TINY, f"train.output_dir={out}", f"data.path={data}", "data.test_size=0"]) == 2
    assert not (tmp_path / "new").exists()


def run_cli(*args: str) -> tuple[int, str, bool]:
    """The CLI in a fresh interpreter: (exit code, stderr, whether torch was imported)."""
    code = (
        "import sys; from mixtral_ft.cli import main; rc = main(sys.argv[1:]); "
        "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    *lines, imported = proc.stderr.strip().splitlines()
    return proc.returncode, "\n".join(lines), imported == "True"


def test_input_errors_come_before_torch_loads(tmp_path):
    # Case 13: recipe, data file and output folder are checked by the time a plain `validate` would answer.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    code, err, torch_loaded = run_cli("train", TINY, f"data.path={bad}", f"train.output_dir={tmp_path / 'o'}")
    assert code == 2 and f"line 2 of '{bad}' is not valid JSON" in err and not torch_loaded
    big = tmp_path / "big.jsonl"
    row = json.dumps({"text": "x" * (9 * 2**20)})
    big.write_text('{"text": "ok"}\n' + row + "\n")
    code, err, torch_loaded = run_cli("train", TINY, f"data.path={big}", f"train.output_dir={tmp_path / 'o'}")
    assert code == 2 and f"line 2 of '{big}' is longer than 8 MiB" in err and not torch_loaded
    assert not (tmp_path / "o").exists()


def test_a_folder_holding_files_the_run_writes_is_refused_and_kept(tmp_path, capsys):
    # A recipe kept beside its outputs (or output_dir: . in a repository) used to be overwritten by the run's own
    # recipe.yaml and model card without a word.
    out = tmp_path / "exp"
    out.mkdir()
    (out / "recipe.yaml").write_text(Path(TINY).read_text())
    (out / "README.md").write_text("my notes\n")
    before = snapshot(out)
    code = main(["train", str(out / "recipe.yaml"), f"train.output_dir={out}", "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"train.output_dir '{out}' holds README.md, recipe.yaml, which the run would overwrite" in err[0]
    assert snapshot(out) == before
