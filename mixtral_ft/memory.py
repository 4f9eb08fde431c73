"""Peak memory, counted the same way by training (run.json), `mixtral-ft bench` and the peers in benchmarks/.

It imports only torch, so the transformers 4.57 peer can measure through it in its side environment.
"""

from __future__ import annotations

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the kernel's peak-RSS mark (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_gib(device: torch.device) -> float:
    """Peak accelerator memory, or on CPU the process's peak resident memory (model, data and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # VmHWM rather than ru_maxrss, which survives exec and so counts a forking parent's pages too.
    with open("/proc/self/status") as status:
        kib = next((int(line.split()[1]) for line in status if line.startswith("VmHWM")), 0)
    return kib / 2**20
