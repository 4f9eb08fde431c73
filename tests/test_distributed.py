"""One GPU or many: launching through accelerate, rank-0-only outputs, DDP and FSDP with NF4 experts.

The slow tests start 2 CPU processes on gloo (OMP_NUM_THREADS=1 each, a free MASTER_PORT) and take
30-60 s apiece on 2 cores. FSDP cannot go through accelerate on CPU (it enables FSDP only on GPUs), so
the CPU FSDP test wraps the model exactly as accelerate and the HF Trainer would (tests/distributed_helpers.py);
the end-to-end FSDP run through the CLI needs 2 GPUs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_ft.cli import main
from mixtral_ft.distributed import launch_args
from mixtral_ft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "distributed_helpers.py"
CONFIGS = ROOT / "accelerate_configs"
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)  # MIXTRAL_FT_CACHE comes from conftest, for the parent and every rank
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("LOCAL_RANK", None)
    return env


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            str(HELPERS),
            *args,
        ]
    )


# --- flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "0"], "--num-processes must be >= 1"),
        (["--num-processes", "-3"], "--num-processes must be >= 1"),
        (["--accelerate-config", "accelerate_configs/nope.yaml"], "not found"),
    ],
)
def test_bad_launch_flags_are_one_line_errors(flags, message, capsys):
    assert main(["train", "recipes/tiny.yaml", *flags, "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_gpu_only_configs_are_refused_on_cpu(tmp_path, capsys, monkeypatch):
    # accelerate would quietly run DDP for an FSDP config on CPU; we say so instead.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("fsdp_qlora", "deepspeed_zero3"):
        code = main(
            [
                "train",
                "recipes/tiny.yaml",
                "--accelerate-config",
                f"accelerate_configs/{name}.yaml",
                "--num-processes",
                "2",
                f"train.output_dir={tmp_path / name}",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and "needs CUDA GPUs" in err and "\n" not in err


def test_workers_refuse_to_launch_again(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "recipes/tiny.yaml", "--num-processes", "2"]) == 2
    assert "under accelerate launch or torchrun" in capsys.readouterr().err


def test_which_configs_shard_the_weights():
    from mixtral_ft.distributed import shards_weights

    assert not shards_weights(None) and not shards_weights(str(CONFIGS / "multi_gpu.yaml"))
    assert shards_weights(str(CONFIGS / "fsdp_qlora.yaml"))


def test_launch_flags_for_cpu_and_gpu():
    env: dict[str, str] = {"MASTER_PORT": "29999"}
    cpu = launch_args(2, None, cuda=False, env=env)
    # accelerate's --cpu starts extra processes only through MPI: take its torchrun path, on gloo.
    assert "--multi_gpu" in cpu and "--cpu" not in cpu and env["ACCELERATE_USE_CPU"] == "true"
    assert cpu[cpu.index("--num_processes") + 1] == "2" and cpu[cpu.index("--main_process_port") + 1] == "29999"
    config = str(CONFIGS / "multi_node.yaml")
    node = launch_args(None, config, cuda=True, env={})
    assert node[:2] == ["--config_file", config] and node[node.index("--num_processes") + 1] == "16"
    assert "--main_process_port" not in node and "--multi_gpu" not in node  # the config says it all
    if torch.cuda.device_count() < 8:
        with pytest.raises(UserError, match="use one process per GPU"):
            launch_args(8, str(CONFIGS / "multi_gpu.yaml"), cuda=True, env={})


TRAIN_TINY = [sys.executable, "-m", "mixtral_ft.cli", "train", "recipes/tiny.yaml"]
FOUR_STEPS = ["train.max_steps=4", "train.save_steps=4", "train.logging_steps=1"]


# --- DDP on CPU ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_through_the_cli(tmp_path):
    out = tmp_path / "run"
    proc = run(
        [*TRAIN_TINY, "--num-processes", "2", f"train.output_dir={out}", *FOUR_STEPS],
        # torch's own per-rank DDP log: proves both ranks built a DDP model and ran backward.
        TORCH_DISTRIBUTED_DEBUG="INFO",
        TORCH_CPP_LOG_LEVEL="INFO",
    )
    log = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"[Rank {rank}]: DDP Initialized with:" in log
        assert re.search(rf"\[rank{rank}\]:[^\n]*buckets rebuilt", log)  # after this rank's first backward
    assert "backend_name: gloo" in log and "world_size: 2" in log
    # DDP sees the 16 LoRA tensors only: the frozen NF4 weights are kept out of its broadcast.
    assert log.count("num_parameter_tensors: 16") == 2

    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert [row["step"] for row in summary["losses"]] == [1, 2, 3, 4]  # logged once per step
    # Rank 0 alone writes and reports: one adapter at the top level, each line once.
    adapters = {p.relative_to(out).as_posix() for p in out.rglob("adapter_model.safetensors")}
    assert adapters == {"adapter_model.safetensors", "checkpoint-4/adapter_model.safetensors"}
    assert proc.stdout.count("saved to ") == 1
    assert proc.stdout.count("audit: ok") == 1
    assert proc.stdout.count("data: builtin:oasst_top1") == 1
    assert proc.stdout.count("{'loss': ") == 4 and proc.stdout.count("{'eval_loss': ") == 1
    assert not list(out.glob(".write_test*"))
    # The figures are the run's, not rank 0's: router telemetry counts both ranks' tokens, as TRL's num_tokens does.
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    first = json.loads((out / "router_stats.jsonl").read_text().splitlines()[0])
    assert history[0]["step"] == first["step"] == 1 and first["tokens"] == history[0]["num_tokens"]
    # tokens_per_s: both ranks' tokens per second of training time (not per GPU), as the card's label says.
    assert summary["tokens"] == max(h.get("num_tokens", 0) for h in history)
    training_s = summary["train_runtime_s"] - summary["eval_and_save_s"]
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / training_s, rel=1e-2)


@pytest.mark.slow
def test_a_worker_refusal_is_one_line_on_stderr(tmp_path):
    """Rank 0 finds the folder locked by another run: its one-line error, exit 2, and nothing from torch's
    launcher (which logged the workers' SIGTERM and exit code besides)."""
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the folder
    try:
        env = {k: v for k, v in worker_env().items() if k != "MIXTRAL_FT_VERBOSE"}
        proc = subprocess.run(
            [*TRAIN_TINY, "--num-processes", "2", f"train.output_dir={out}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        os.close(fd)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "is in use by another run" in lines[0], proc.stderr


@pytest.mark.slow
def test_ranks_hold_identical_adapters_after_training(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "dump"
    proc = torchrun(
        "dump",
        str(out),
        "recipes/tiny.yaml",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.logging_steps=1",
    )
    assert "rank 0 of 2 trained 2 steps" in proc.stdout and "rank 1 of 2 trained 2 steps" in proc.stdout
    init, rank0, rank1 = (load_file(out / f"{name}.safetensors") for name in ("init", "rank0", "rank1"))
    assert rank0.keys() == rank1.keys() == init.keys() and len(rank0) == 16
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    # ...and they trained: LoRA B starts at zero and has moved (different data on each rank, averaged grads).
    assert any(not torch.equal(rank0[k], init[k]) for k in rank0 if "lora_B" in k)

    # Rank 1 peaked far above rank 0 (its ballast): run.json's and the checkpoint's peak are the highest rank's,
    # not rank 0's, while the memory by phase is rank 0's and says so.
    rank1_peak = json.loads((out / "rank1_peak.json").read_text())
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["memory"]["rank"] == 0 and summary["memory"]["train_peak_gib"] < rank1_peak
    assert summary["peak_memory_gib"] >= round(rank1_peak, 3)
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "mixtral_ft_state.json").read_text())
    assert state["peak_memory_gib"] >= rank1_peak
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"| peak_memory_gib (per process, the highest of 2) | {summary['peak_memory_gib']} |" in card
    assert "| tokens_per_s (all 2 processes, not per GPU) |" in card


# --- FSDP ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_shards_nf4_experts_on_cpu(tmp_path):
    torchrun("fsdp", str(tmp_path), str(CONFIGS / "fsdp_qlora.yaml"))
    reports = [json.loads((tmp_path / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["storage"] == "torch.bfloat16"  # float storage under FSDP
        # Same loss as the unsharded model on this rank's batch: the 4-bit states survived flattening.
        assert report["fsdp_loss"] == report["reference_loss"]
        assert report["loss_after_step"] < report["fsdp_loss"]
        # Sharded, experts included: each rank keeps half of every flat parameter, expert layers too.
        assert report["local_numel"] * 2 - report["full_numel"] < report["packed_expert_numel"] // 2
        assert len(report["expert_units"]) == 2
        assert all(local * 2 <= full + 2 for local, full in report["expert_units"])
        # A full state dict (how the Trainer saves under FSDP) still carries the NF4 statistics.
        assert len(report["expert_stats_in_state_dict"]) == 2
    assert reports[0]["lora_sums"] == reports[1]["lora_sums"] and len(reports[0]["lora_sums"]) == 16


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP through accelerate needs 2 CUDA GPUs")
def test_fsdp_through_the_cli_on_gpus(tmp_path):
    out = tmp_path / "run"
    proc = run(
        [
            *TRAIN_TINY,
            *("--accelerate-config", "accelerate_configs/fsdp_qlora.yaml", "--num-processes", "2"),
            *(f"train.output_dir={out}", *FOUR_STEPS, "model.compute_dtype=bfloat16"),
        ]
    )
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and len(summary["losses"]) == 4
    assert (out / "adapter_model.safetensors").is_file() and proc.stdout.count("saved to ") == 1
