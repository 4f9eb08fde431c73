"""Issue 16, cases 1, 2, 5 and 6 on the tiny recipe, CPU: resuming is exact in run.json too, a run that reached its
last step only finishes its outputs, a full disk is one line and exit 74, and a checkpoint is checked byte by byte.
"""

import contextlib
import json
import resource
import shutil
import signal
import struct

import pytest
from transformers import TrainerCallback

from mixtral_ft.train.checksums import MANIFEST
from mixtral_ft.train.resume import checkpoint_problem, newest_complete
from tests.conftest import adapter_bytes, callback_first, make_checkpoint, signal_at, train

TIMINGS = {"tokens_per_s", "train_runtime_s", "eval_and_save_s", "wall_s", "peak_memory_gib", "memory"}
PART = {"resumed_at_step"}  # says that wall_s and memory are the last part's


def run_json(out) -> dict:
    return {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k not in TIMINGS | PART}


@pytest.fixture(scope="module")
def reference5(tmp_path_factory):
    # Logged every 5 steps: the window 1-5 spans the interruption at step 3 below.
    out = tmp_path_factory.mktemp("edges") / "reference5"
    assert train(out, "train.logging_steps=5")[0] == 0
    return out


@pytest.mark.slow
def test_resume_from_the_last_steps_checkpoint_only_finishes_the_outputs(tmp_path, capsys):
    # Case 1: a kill during the final save leaves checkpoint-6 complete and no run.json.
    ref = tmp_path / "ref"
    assert train(ref, "train.lr_scheduler_type=constant")[0] == 0
    assert (ref / "checkpoint-6").is_dir()
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    (out / "run.json").unlink()
    capsys.readouterr()
    assert train(out, "train.lr_scheduler_type=constant")[0] == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert run_json(out)["steps"] == 6
    assert adapter_bytes(out) == adapter_bytes(ref)
    assert run_json(out) == run_json(ref)


@pytest.mark.slow
def test_run_json_after_a_resume_equals_the_uninterrupted_one(reference5, tmp_path):
    # Case 2: the window spanning the resume point, train_loss and tokens are carried across the resume.
    out = tmp_path / "resumed"
    with signal_at(3, signal.SIGINT):
        assert train(out, "train.logging_steps=5")[0] == 130
    assert train(out, "train.logging_steps=5")[0] == 0
    assert adapter_bytes(out) == adapter_bytes(reference5)
    assert run_json(out) == run_json(reference5)  # losses (step 5's window), train_loss, tokens: all equal
    resumed, whole = (json.loads((o / "run.json").read_text()) for o in (out, reference5))
    assert resumed["tokens_per_s"] > 0
    assert (resumed["resumed_at_step"], whole["resumed_at_step"]) == (3, None)


@pytest.mark.slow
def test_peak_memory_of_a_resumed_run_is_the_highest_of_its_parts(tmp_path):
    # Each process measures only its own part: the peak before the resume comes from the checkpoint.
    from mixtral_ft.train.carry import STATE
    from mixtral_ft.train.checksums import write_manifest

    out = tmp_path / "resumed"
    with signal_at(3, signal.SIGINT):
        assert train(out)[0] == 130
    state_file = out / "checkpoint-3" / STATE
    state = json.loads(state_file.read_text())
    assert state["peak_memory_gib"] > 0  # the first part's peak, recorded
    state["peak_memory_gib"] = 999.0  # a first part far higher than anything the tiny run reaches
    state_file.write_text(json.dumps(state))
    write_manifest(state_file.parent)
    assert train(out)[0] == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_at_step"] == 3
    assert run["peak_memory_gib"] == 999.0
    assert run["memory"]["train_peak_gib"] < 999.0  # `memory` stays the last part's own
    assert json.loads((out / "checkpoint-6" / STATE).read_text())["peak_memory_gib"] == 999.0


@contextlib.contextmanager
def fill_disk_at(step: int, limit: int):
    """From the end of `step` on, no file may grow past `limit` bytes: what a full disk does to the next save."""

    class Fill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    try:
        with callback_first(Fill()):
            yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_exit_74_and_the_last_checkpoint_survives(reference5, tmp_path):
    # Case 5: checkpoint-2 saves; at checkpoint-4 the disk is "full" (optimizer.pt cannot be written).
    out = tmp_path / "full"
    with fill_disk_at(3, 100_000):
        code, err = train(out, "train.logging_steps=5", "train.save_steps=2")
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("error:")]
    assert code == 74, err[-2000:]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert str(out) in lines[0] and "File too large" in lines[0]
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in lines[0]
    assert newest_complete(out)[0] == out / "checkpoint-2" and checkpoint_problem(out / "checkpoint-4")
    assert train(out, "train.logging_steps=5", "train.save_steps=2")[0] == 0  # space freed: the same command
    assert adapter_bytes(out) == adapter_bytes(reference5) and run_json(out) == run_json(reference5)


def test_checkpoint_checksums_catch_flipped_bytes_and_a_huge_header(tmp_path):
    # Case 6: same size, different bytes; and a header length field of 10**12 (no MemoryError, no traceback).
    out = tmp_path / "run"
    good = make_checkpoint(out, 2)
    bad = make_checkpoint(out, 4)
    weights = bad / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"  # inside the tensor data
    weights.write_bytes(bytes(data))
    assert checkpoint_problem(bad) == "adapter_model.safetensors does not match its checksum (corrupted)"
    assert newest_complete(out)[0] == good
    data[:8] = struct.pack("<Q", 10**12)
    weights.write_bytes(bytes(data))
    assert checkpoint_problem(bad) == "adapter_model.safetensors has a corrupt header"
    (good / MANIFEST).unlink()
    assert checkpoint_problem(good) == f"no {MANIFEST} (the save was cut short)"


def test_rewinding_beside_later_checkpoints_is_refused_without_overwrite(tmp_path):
    """`train.resume: checkpoint-2` beside checkpoint-4: a later `resume: auto` would take the abandoned step 4 for
    this run's, so the later folders must go, and only train.overwrite may delete them."""
    from tests.conftest import RUN

    out = tmp_path / "run"
    for step in (2, 4, 6):
        make_checkpoint(out, step, tuple(RUN))
    code, err = train(out, "train.resume=checkpoint-2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "goes back to step 2" in lines[0] and "checkpoint-4, checkpoint-6" in lines[0] and "overwrite" in lines[0]
    assert "train.resume=auto" in lines[0]  # a restart of the rewound run itself must not delete its own saves
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_rewinding_with_overwrite_replaces_the_abandoned_steps(reference5, tmp_path):
    out = tmp_path / "rewound"
    with signal_at(4, signal.SIGINT):
        assert train(out, "train.logging_steps=5", "train.save_steps=2")[0] == 130
    (out / "checkpoint-4" / "abandoned.txt").write_text("from the run we went back on")
    code, err = train(
        out, "train.logging_steps=5", "train.save_steps=2", "train.resume=checkpoint-2", "train.overwrite=true"
    )
    assert code == 0, err
    assert not (out / "checkpoint-4" / "abandoned.txt").exists()  # step 4 saved anew, not into the old folder
    assert checkpoint_problem(out / "checkpoint-4") is None
    assert adapter_bytes(out) == adapter_bytes(reference5)  # the rewound run is exact


@pytest.mark.slow
def test_tokens_per_s_after_a_resume_counts_only_this_processes_tokens(tmp_path, monkeypatch):
    # A clock that ticks one second per reading: each logged tokens_per_s is then its window's token count. The first
    # window after the resume holds steps 3-4; it once counted the tokens of steps 1-3 too (trained before the kill).
    import itertools

    import mixtral_ft.train.telemetry

    monkeypatch.setattr(mixtral_ft.train.telemetry, "perf_counter", itertools.count().__next__)
    out = tmp_path / "resumed"
    with signal_at(3, signal.SIGINT):
        assert train(out)[0] == 130
    assert train(out)[0] == 0
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    tokens = {h["step"]: h["num_tokens"] for h in history if "loss" in h}
    rates = {h["step"]: h["tokens_per_s"] for h in history if "loss" in h}
    assert rates[4] == tokens[4] - tokens[3]
    assert rates[1] == tokens[1] and rates[5] == tokens[5] - tokens[4]


@pytest.mark.slow
def test_rotation_after_a_save_cut_short_keeps_a_complete_checkpoint(tmp_path, capsys):
    """save_total_limit 2 keeps a complete checkpoint through every save, even after a kill during a save.

    A preemption's save cut short (checkpoint-3, unsealed) is skipped by the resume; left there, it counted towards
    the limit, so the resumed run's next save (checkpoint-4) deleted checkpoint-2, the only complete one, and until
    checkpoint-4 was sealed a kill would have left nothing to resume from."""
    out, keep = tmp_path / "run", ("train.save_steps=2", "train.save_total_limit=2")
    with signal_at(3, signal.SIGTERM):
        assert train(out, *keep)[0] == 143
    (out / "checkpoint-3" / MANIFEST).unlink()  # the kill came before the manifest
    found = {}

    class Probe(TrainerCallback):  # first: runs after the Trainer's rotation, before carry.py seals the new folder
        def on_save(self, args, state, control, **kwargs):
            found[state.global_step] = newest_complete(out)[0]

    capsys.readouterr()
    with callback_first(Probe()):
        code, err = train(out, *keep)
    assert code == 0, err
    assert "resume: removed checkpoint-3 (cut short)" in capsys.readouterr().out
    assert found == {4: out / "checkpoint-2", 6: out / "checkpoint-4"}, found
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
