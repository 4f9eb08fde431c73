"""A stopped `mixtral-ft bench` leaves a result file that says so: real tiny runs on CPU, stopped at their second
batch by a real signal (Ctrl-C, SIGTERM) or an error raised from a torch forward hook."""

import importlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from mixtral_ft.bench import throughput as bench
from mixtral_ft.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--seq", "16"]


def stop_at_batch(batch: int, out: Path, stop, seen: list):
    """A global forward hook: at the first forward of `batch`, note what the result file holds then, and stop."""

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Embedding) and inputs[0].shape[0] == batch and not seen:
            [path] = out.glob("*.json")
            seen.append(json.loads(path.read_text()))
            stop()

    return torch.nn.modules.module.register_module_forward_hook(hook)


def raise_error():
    raise RuntimeError("boom in a forward hook\nsecond line")


@pytest.mark.parametrize(
    "stop, outcome, reason",
    [
        (lambda: os.kill(os.getpid(), signal.SIGINT), 130, "interrupted (Ctrl-C) at batch 3"),
        (lambda: os.kill(os.getpid(), signal.SIGTERM), SystemExit, "SIGTERM at batch 3"),
        (raise_error, RuntimeError, "RuntimeError at batch 3: boom in a forward hook"),
    ],
    ids=["ctrl-c", "sigterm", "crash"],
)
def test_a_stopped_run_keeps_its_batches_and_says_it_is_partial(tmp_path, capsys, stop, outcome, reason):
    out, seen = tmp_path / "out", []
    sigterm_before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or a plugin's: the test asserts it comes back
    handle = stop_at_batch(3, out, stop, seen)
    argv = ["bench", *SMOKE, "--batch", "2", "3", "4", "--out-dir", str(out)]
    try:
        if isinstance(outcome, int):
            assert main(argv) == outcome
        else:
            with pytest.raises(outcome) as raised:
                main(argv)
            assert outcome is not SystemExit or raised.value.code == 128 + signal.SIGTERM
    finally:
        handle.remove()
    # What a SIGKILL at that moment would have left: B2, measured, and the file not complete.
    [before] = seen
    assert before["complete"] is False and before["pending"] == [3, 4] and "stopped" not in before
    assert [r["batch"] for r in before["runs"]] == [2] and before["tok_per_s"][0] > 0
    [path] = out.iterdir()  # no stray .partial file
    report = json.loads(path.read_text())
    assert report["complete"] is False and report["stopped"] == reason and report["pending"] == [3, 4]
    assert report["batch"] == [2, 3, 4] and report["runs"] == before["runs"] and len(report["tok_per_s"]) == 1
    err = capsys.readouterr().err
    assert f"stopped: {reason}; {path} keeps B2 (complete: false)" in err
    assert signal.getsignal(signal.SIGTERM) is sigterm_before  # the handler is bench's only while it runs


def test_a_finished_run_is_marked_complete(tmp_path):
    assert main(["bench", *SMOKE, "--batch", "1", "2", "--out-dir", str(tmp_path)]) == 0
    [path] = tmp_path.iterdir()
    report = json.loads(path.read_text())
    assert report["complete"] is True and report["pending"] == [] and "stopped" not in report
    assert [r["batch"] for r in report["runs"]] == [1, 2]


def test_the_file_exists_from_the_start_and_names_never_collide(tmp_path):
    """Created before the model is built: killed then, the run still leaves a file that says nothing was measured;
    a second run of the same name gets -2 at once, not when its first batch is done."""
    args = bench.parse_args([*SMOKE, "--out-dir", str(tmp_path), "--tag", "t"])
    first = bench.open_result(args, bench.new_report(args, torch.device("cpu")))
    second = bench.open_result(args, bench.new_report(args, torch.device("cpu")))
    assert second.name == f"{first.stem}-2.json"
    for path in (first, second):
        report = json.loads(path.read_text())
        assert report["complete"] is False and report["pending"] == [2] and report["runs"] == []


def test_the_collector_flags_a_partial_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    collect = importlib.import_module("gpu_collect")
    out, seen = tmp_path / "out", []
    handle = stop_at_batch(3, out, lambda: os.kill(os.getpid(), signal.SIGINT), seen)
    try:
        assert main(["bench", *SMOKE, "--batch", "2", "3", "--out-dir", str(out)]) == 130
    finally:
        handle.remove()
    [path] = out.iterdir()
    lines = collect.bench_lines(json.loads(path.read_text()), "lever-x")
    assert "PARTIAL: interrupted (Ctrl-C) at batch 3; not measured: B3" in lines[0]
    assert "B2:" in lines[1] and len(lines) == 2
    [killed] = seen  # the file as a SIGKILL would have left it
    killed_line = collect.bench_lines(killed, "t")[0]
    assert "PARTIAL: killed with no word (SIGKILL, the OOM killer); not measured: B3" in killed_line
    complete = json.loads(path.read_text()) | {"complete": True, "pending": []}
    assert not any("PARTIAL" in line for line in collect.bench_lines(complete, "t"))


def test_compare_stopped_in_a_peer_names_the_batch_it_was_on(tmp_path, monkeypatch, capsys):
    """compare.py records ours at a batch, then runs the peers at it: a stop there is at that batch, not the next
    pending one (nor, at the last batch, at none)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    compare = importlib.import_module("compare")

    def hook(module, inputs, output):  # stock transformers 5's experts: only the v5 peer has them (ours are NF4)
        if type(module) is MixtralExperts:
            raise RuntimeError("boom in the v5 peer")

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    out = tmp_path / "out"
    try:
        with pytest.raises(RuntimeError, match="boom in the v5 peer"):
            compare.main([*SMOKE, "--batch", "2", "3", "--peer-v5-layers", "1", "--out-dir", str(out)])
    finally:
        handle.remove()
    [path] = out.iterdir()
    report = json.loads(path.read_text())
    assert report["stopped"] == "RuntimeError at batch 2: boom in the v5 peer" and report["pending"] == [3]
    assert [r["batch"] for r in report["runs"]] == [2] and report["complete"] is False
