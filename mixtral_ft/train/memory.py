"""Memory of a training run by phase, for run.json: the load peak, the loaded model, the training peak.

The streaming loader quantizes one layer at a time, so loading should peak at the NF4 model plus about one
layer of bf16 experts, never the bf16 model; `load_peak_gib` against `model_gib` shows it. The peak is
reset once the model is loaded and prepared (LoRA, compile, audit), so `train_peak_gib` is the training
loop's own (steps, evaluation, checkpoints).

On a GPU the numbers are torch's allocated tensors on this rank's device (`memory_allocated`,
`max_memory_allocated`); the CUDA context and the caching allocator's slack come on top. On CPU they are
the process's resident memory (VmRSS, VmHWM), so they include Python, the libraries and the data. Each
process measures its own; run.json is written by rank 0, so `memory` holds rank 0's (its `peak_memory_gib` is the
highest rank's: carry.run_peak_gib).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixtral_ft.common import current_gib, peak_gib, rank, reset_peak

SOURCES = {
    "cuda": "torch.cuda memory_allocated / max_memory_allocated (tensors on this device)",
    "cpu": "process resident memory, VmRSS / VmHWM (includes Python, libraries and data)",
}


@dataclass
class PhaseMemory:
    """Call `loading()` before the model loads, `loaded()` once it is ready to train, `summary()` after training."""

    device: torch.device
    load_peak_gib: float | None = None
    model_gib: float | None = None
    peak_reset: bool = True  # False where the CPU peak could not be reset: a later peak is then the process's

    def loading(self) -> None:
        self.peak_reset = reset_peak(self.device)

    def loaded(self) -> None:
        self.load_peak_gib = peak_gib(self.device)
        self.model_gib = current_gib(self.device)
        self.peak_reset = reset_peak(self.device) and self.peak_reset

    def train_peak_gib(self) -> float:
        return peak_gib(self.device)

    def summary(self) -> dict:
        train_peak = self.train_peak_gib()
        return {
            "device": str(self.device),
            "rank": rank(),
            "source": SOURCES.get(self.device.type, SOURCES["cpu"]),
            "load_peak_gib": _round(self.load_peak_gib),
            "model_gib": _round(self.model_gib),
            "train_peak_gib": _round(train_peak),
            "peaks_reset_between_phases": self.peak_reset,
        }

    def overall_peak_gib(self) -> float:
        """The run's peak over both phases: what `peak_memory_gib` has always meant."""
        return max(self.load_peak_gib or 0.0, self.train_peak_gib())


def _round(gib: float | None) -> float | None:
    return None if gib is None else round(gib, 3)
