"""benchmarks/gpu_truth.py, the one prepared GPU session: its budget, its state across calls, what it hands back.

The dry run is the GPU plan itself on CPU with tiny shapes, so the scripts a scarce GPU session runs have run here.
"""

import importlib
import json
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import requires_compile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def truth(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_truth")


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (a killed orphan waits as one until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_stage_past_its_time_is_stopped_with_its_children(truth, tmp_path):
    pid_file = tmp_path / "child.pid"
    command = ["sh", "-c", f"sleep 120 & echo $! > {pid_file}; wait"]
    with open(tmp_path / "log", "w") as log:
        result = truth.run_stage(truth.Stage("slow", 1, [command, ["touch", str(tmp_path / "never")]]), 5, log)
    assert result["status"] == "stopped at the budget"
    assert not (tmp_path / "never").exists()  # the stage's later commands do not start
    assert gone(int(pid_file.read_text()))  # the background child went with its parent's process group


def test_a_failing_command_ends_its_stage(truth, tmp_path):
    with open(tmp_path / "log", "w") as log:
        result = truth.run_stage(
            truth.Stage("x", 1, [[sys.executable, "-c", "raise SystemExit(3)"], ["true"]]), 60, log
        )
    assert result["status"] == "failed (exit 3)" and len(result["commands"]) == 1


def test_unknown_stage_exits_2(truth, tmp_path, capsys):
    assert truth.main(["--dry-run", "--only", "env,bogus", "--work", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown stage(s) bogus: use --list to see them"


def test_a_stage_whose_estimate_does_not_fit_is_skipped_and_noted(truth, tmp_path):
    assert (
        truth.main(["--dry-run", "--only", "train", "--work", str(tmp_path), "--out", str(tmp_path), "--budget", "100"])
        == 0
    )
    table = json.loads((tmp_path / "gpu-truth.json").read_text())
    assert table["stages"] == {"train": {"skipped": "call 1: 100 s left"}}  # train's estimate is 150 s


@requires_compile
@pytest.mark.slow
def test_dry_run_measures_keeps_state_and_hands_back_three_files(truth, tmp_path):
    # A budget no CPU comes near: what a stop at the budget does is the first test's, not this one's.
    work, first, second = tmp_path / "work", tmp_path / "out1", tmp_path / "out2"
    argv = ["--dry-run", "--work", str(work), "--budget", "3000"]
    assert truth.main([*argv, "--out", str(first), "--only", "env,checks,lever-reuse"]) == 0
    table = json.loads((first / "gpu-truth.json").read_text())
    assert {n: s["status"] for n, s in table["stages"].items()} == {"env": "ok", "checks": "ok", "lever-reuse": "ok"}
    assert sorted(p.name for p in first.iterdir()) == ["gpu-truth-1.log", "gpu-truth.json", "gpu-truth.tar.gz"]
    with tarfile.open(first / "gpu-truth.tar.gz") as tar:
        names = tar.getnames()
        checks = json.loads(tar.extractfile("checks.json").read())
    assert "env.json" in names and "gpu-tests.xml" in names
    assert any(n.startswith("bench/") and n.endswith("-lever-reuse.json") for n in names)
    assert checks["grouped_gemm_layouts"]["ok"] and checks["model_against_reference"]["ok"]

    # A second call on the same machine (a fresh $OUT) goes on where the first stopped; done stages are not rerun.
    assert truth.main([*argv, "--out", str(second), "--only", "env"]) == 0
    assert "$ " not in (second / "gpu-truth-2.log").read_text()
    assert len(json.loads((second / "gpu-truth.json").read_text())["calls"]) == 2

    collect = importlib.import_module("gpu_collect")
    results = tmp_path / "results"
    paths = collect.collect(second, results)
    assert any(line.endswith("checks.json: ok") for line in collect.summary(paths))
    assert any("-lever-reuse " in line and " tok/s, peak " in line for line in collect.summary(paths))
    written = {p.name for p in paths}
    assert {"gpu-truth-2.log", "gpu-truth.json", "checks.json"} <= {n.split("-cpu-", 1)[-1] for n in written}
    assert all(n.startswith(f"{table['calls'][0]['started'][:10]}-cpu-") for n in written), written
