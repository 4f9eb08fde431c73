"""A Ctrl-C or SIGTERM while several processes tokenize: one line, the signal's exit code, no process left behind."""

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = 30_000  # about 15 s of tokenizing on two cores: the signal lands while the workers are busy


def big_file(path: Path) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    with path.open("w") as f:
        for i in range(ROWS):
            turns = [
                {"role": "user", "content": f"Question {i}: " + " ".join(rng.choices(words, k=60))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=80))},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def session_processes(sid: int) -> list[int]:
    """The PIDs still alive in session `sid` (the command, its workers and datasets' manager process)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.getsid(int(entry.name)) == sid and state != "Z":
                    alive.append(int(entry.name))
            except (OSError, IndexError):
                pass  # gone meanwhile
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "signum, to_group, code, last_line",
    [
        (signal.SIGINT, True, 130, "interrupted"),  # Ctrl-C: the terminal signals the whole process group
        (signal.SIGTERM, False, 143, None),  # `kill PID`: the workers must not outlive the command
        (signal.SIGTERM, True, 143, None),  # a scheduler stopping the job's process group
    ],
)
def test_a_signal_during_parallel_tokenizing(signum, to_group, code, last_line, tmp_path):
    data = big_file(tmp_path / "big.jsonl")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    argv = ["data", str(ROOT / "recipes" / "tiny.yaml"), f"data.path={data}", "data.num_proc=2", "data.test_size=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixtral_ft.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    err, deadline = b"", time.time() + 300
    while f"/{ROWS}".encode() not in err.split(b"data: tokenizing")[-1] or b" 0/" in err[-80:]:
        assert time.time() < deadline and proc.poll() is None, err.decode(errors="replace")[-2000:]
        if select.select([proc.stderr], [], [], 1)[0]:
            err += os.read(proc.stderr.fileno(), 65536)  # the bar redraws with \r: no lines to wait for
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    try:
        err += proc.communicate(timeout=60)[1]  # a worker left alive would hold stderr open
    finally:
        leftover = session_processes(proc.pid)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    text = err.decode(errors="replace")
    assert proc.returncode == code and leftover == [], text[-2000:]
    assert "Traceback" not in text and "Error" not in text, text[-3000:]
    if last_line:
        assert text.splitlines()[-1] == last_line
