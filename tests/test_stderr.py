"""A bad command prints exactly one line on stderr, with the locked library versions: nothing from them.

Each command runs in a fresh process, as a user runs it, so import-time logging (bitsandbytes 0.50 logs a
missing `kernels` package on a CPU with avx512_bf16) and warnings are counted too.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")

# (arguments, expected part of the one line); {tmp} is a scratch folder, {full} a folder with a file in it.
BAD = [
    (["train", TINY, "lora.rank=3", "train.output_dir={tmp}/o1"], "unknown key 'lora.rank'"),
    (["train", TINY, "data.path={tmp}/none.jsonl", "train.output_dir={tmp}/o2"], "data: file"),
    (["train", TINY, "model.name={full}", "train.output_dir={tmp}/o3"], "has no config.json"),
    (["audit", "{tmp}/missing"], "neither a local folder nor a hub id"),
    (["quantize", "tiny", "{full}"], "already exists and is not empty"),
    (["merge", "{tmp}/missing", "--out", "{tmp}/o4"], "not found or has no adapter_config.json"),
    (["chat", "{tmp}/missing", "--prompt", "hi"], "neither a local folder nor a hub id"),
    (["eval", "{tmp}/missing"], "neither a training output folder nor a .yaml recipe"),
]


@pytest.mark.slow
def test_bad_commands_print_one_line_on_stderr(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_FT_VERBOSE"}
    env["PYTHONWARNINGS"] = "default"  # warnings shown as a user's Python shows them, not as pytest filters them
    for argv, expected in BAD:
        argv = [a.format(tmp=tmp_path, full=full) for a in argv]
        proc = subprocess.run(
            [sys.executable, "-m", "mixtral_ft.cli", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=tmp_path,
        )
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, lines)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_torch_keeps_its_logger_at_error_after_its_import():
    """torch sets its logger back to WARNING as it imports; quiet_third_party's TORCH_LOGS default keeps it at ERROR."""
    code = (
        "from mixtral_ft.quiet import quiet_third_party as q; q(); "
        "import logging, torch; print(logging.getLogger('torch').level)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MIXTRAL_FT_VERBOSE", "TORCH_LOGS")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert run.stdout.strip() == str(logging.ERROR), run.stderr


def test_the_compile_pool_is_left_cold_only_on_torch_older_than_2_7(monkeypatch):
    """torch 2.6 starts inductor's compile workers at import (their exit warnings reached stderr); newer torch
    warms them at the first compile, which train.compile wants: TORCH_WARM_POOL stays unset there."""
    import importlib.metadata

    from mixtral_ft import quiet

    for installed, cold in (("2.6.0+cu124", True), ("2.13.0+cpu", False), ("2.15.0", False)):
        monkeypatch.delenv("TORCH_WARM_POOL", raising=False)
        monkeypatch.delenv("MIXTRAL_FT_VERBOSE", raising=False)
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=installed: v)
        quiet.quiet_third_party()
        assert (os.environ.get("TORCH_WARM_POOL") == "0") is cold, installed
