"""What every stage may ask of the process it runs in: its rank, the cache folder, and its peak memory.

One home for the environment variables torchrun / accelerate set (RANK, LOCAL_RANK, WORLD_SIZE), read
before torch.distributed is initialised (the data report and audit print before the Trainer exists). It
imports nothing heavy (torch only inside the memory functions): `train` reads it before deciding to load
torch, and the transformers 4.57 peer in benchmarks/ measures through it in its side folder.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def rank() -> int:
    """This process's global rank (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: the GPU it owns."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """The launcher's processes on this machine (1 outside a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def distributed_initialized() -> bool:
    """True once torch.distributed has a process group (inside a DDP/FSDP run)."""
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def under_launcher() -> bool:
    """True inside a worker started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ


def fsdp_enabled() -> bool:
    """accelerate sets ACCELERATE_USE_FSDP in every worker it starts from an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def human_bytes(n: float, digits: int = 2) -> str:
    """1536 -> '1.50 KiB': sizes in audit tables and upload lists."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} GiB"


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Inside the block, SIGTERM (a scheduler, `kill`) raises SystemExit(143), so `finally` and `except` clauses run
    (the default handler just dies); the previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; SIGTERM's default then applies
        return

    owner = os.getpid()

    def unwind(signum, frame):
        if os.getpid() != owner:  # a forked child (datasets' pool and its manager) inherited this: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cache_root() -> Path:
    """Where mixtral_ft keeps what it builds once (the tiny model, the tokenizer file): $MIXTRAL_FT_CACHE."""
    return Path(os.environ.get("MIXTRAL_FT_CACHE", Path.home() / ".cache" / "mixtral_ft"))


NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def why_no_cuda(driver_file: Path = NVIDIA_DRIVER_FILE, devices: Path = Path("/dev")) -> str:
    """Why torch sees no CUDA GPU, as a clause for an error line (call it when `torch.cuda.is_available()` is False).

    The common trap is a GPU machine with the wrong torch: PyPI's Linux wheel targets a recent CUDA, which an
    older driver cannot run, and torch then reports no GPU rather than an error.
    """
    import torch

    try:
        driver = driver_file.read_text()
    except OSError:
        return "this machine has no NVIDIA driver"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: install a CUDA build (pytorch.org/get-started/locally)"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES='{hidden}' hides every GPU"
    if not any(devices.glob("nvidia[0-9]*")):
        return f"no GPU device is visible ({devices}/nvidia*): in a container, start it with GPUs (docker --gpus all)"
    found = re.search(r"Kernel Module(?: for \S+)?\s+([\d.]+)", driver)
    return (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which NVIDIA driver "
        f"{found.group(1) if found else '(version unknown)'} may be too old to run: install the torch build for the "
        f"CUDA version nvidia-smi shows (pytorch.org/get-started/locally)"
    )


def reset_peak(device: torch.device) -> bool:
    """Start a new peak from what is held now; False where the kernel refuses (CPU: the peak stays the process's)."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # "5" resets the kernel's peak-RSS mark (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _proc_status_gib(field: str) -> float:
    with open("/proc/self/status") as status:
        kib = next((int(line.split()[1]) for line in status if line.startswith(field + ":")), 0)
    return kib / 2**20


def current_gib(device: torch.device) -> float:
    """Memory held now: allocated tensors on a GPU, or on CPU the process's resident memory (libraries and data too)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return _proc_status_gib("VmRSS")


def peak_gib(device: torch.device) -> float:
    """Peak accelerator memory, or on CPU the process's peak resident memory (model, data and libraries)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # VmHWM rather than ru_maxrss, which survives exec and so counts a forking parent's pages too.
    return _proc_status_gib("VmHWM")


# --- progress for the commands that take minutes (eval, merge, quantize): lines on stderr, stdout keeps results

_started: dict[str, float] = {}


def say(command: str, message: str) -> None:
    """One progress line for `command`, stamped with the seconds since its first line."""
    start = _started.setdefault(command, time.monotonic())
    print(f"{command}: [{time.monotonic() - start:.0f}s] {message}", file=sys.stderr, flush=True)


def bar(iterable, desc: str, total: int | None = None):
    """A tqdm bar on stderr (shown on terminals, silent in logs that are not one)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, mininterval=1.0, disable=None)
