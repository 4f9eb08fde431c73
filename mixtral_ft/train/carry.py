"""What a resume needs beyond the Trainer's checkpoint, so an interrupted run logs and reports as an unbroken one.

The Trainer restores the weights, optimizer, scheduler, RNG and step, but starts its loss bookkeeping afresh: the
loss summed since the last log (the logging window that spans the resume point), the run's loss total (hence
`train_loss`), TRL's token count and its per-window metrics. `CarryState.on_save` writes them, exactly, into each
checkpoint (`mixtral_ft_state.json`) with the run's peak memory so far (each process measures its own; the
checkpoint keeps the highest rank's), then seals the folder with its checksum manifest (checksums.py), last.
`on_train_begin` puts them back when a run resumes from such a checkpoint.

It also keeps the run's clock for throughput: the seconds spent evaluating and saving checkpoints (from a step's
end to the end of its evaluation and save) are pauses, which tokens/s leaves out, so that a run that evaluates
often does not look slower per token than one that does not.

A checkpoint at the run's last step means training is done: `train_or_finish` then loads its weights and log
history and returns a TrainOutput without another step (the Trainer would run one: it checks the step count only
after a step).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from time import perf_counter

import torch
from transformers import TrainerCallback

from mixtral_ft.common import distributed_initialized
from mixtral_ft.train.checksums import write_manifest

STATE = "mixtral_ft_state.json"


def _per_rank(value: float, device) -> list[float]:
    """`value` from every rank (float64 holds the fp32 loss sum exactly); a collective when distributed."""
    if not distributed_initialized():
        return [value]
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    return [float(t.item()) for t in every]


def read_state(folder: Path | None) -> dict | None:
    try:
        return json.loads((Path(folder) / STATE).read_text()) if folder else None
    except (OSError, ValueError):
        return None  # a checkpoint of an older version or a plain Trainer: resume as the Trainer does


class CarryState(TrainerCallback):
    """Saves and restores the run-level bookkeeping; append it last, so its manifest is the last file written."""

    def __init__(self, trainer, resume_from: Path | None, peak: Callable[[], float] | None = None):
        self.trainer, self.resume_from = trainer, resume_from
        self.peak = peak or (lambda: 0.0)  # this process's peak memory in GiB so far
        self.previous_runtime = 0.0  # seconds of training before this process resumed
        self.previous_peak = 0.0  # GiB: the highest peak of the parts before this process
        self.previous_paused = 0.0  # seconds of evaluation and saving before this process resumed
        self.paused = 0.0  # this process's seconds of evaluation and saving
        self.step_ended: float | None = None  # when the pause in progress began (None: no step yet)
        self.resumed_at: int | None = None  # the step this process resumed at (None: a fresh run)
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        self.resumed_at = state.global_step if self.resume_from else None
        saved = read_state(self.resume_from)
        if saved and saved.get("global_step") == state.global_step:
            self.resume(saved)

    def resume(self, saved: dict) -> None:
        """The saved bookkeeping back into the trainer, and the training time before this process."""
        restore(self.trainer, saved)
        self.previous_runtime = float(saved.get("runtime_s", 0.0))
        self.previous_peak = float(saved.get("peak_memory_gib") or 0.0)
        self.previous_paused = float(saved.get("paused_s") or 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if (control.should_evaluate or control.should_save) and args.device.type == "cuda":
            torch.cuda.synchronize(args.device)  # the step's queued kernels are training time, not the pause's
        self.step_ended = perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        self.pause_ends()

    def pause_ends(self) -> None:
        """An evaluation or a save just ended: the time since the step's end (or the previous pause) is a pause."""
        if self.step_ended is not None:
            now = perf_counter()
            self.paused += now - self.step_ended
            self.step_ended = now

    def on_save(self, args, state, control, **kwargs):
        self.pause_ends()  # the checkpoint's files are written; sealing it (below) is left out of the pause
        t = self.trainer
        partials = _per_rank(float(t._tr_loss), args.device)  # every rank: a collective
        peak = max(_per_rank(max(self.previous_peak, self.peak()), args.device))  # any rank's GPU: a collective too
        if distributed_initialized():
            torch.distributed.barrier()  # every rank's files (rng_state_N.pth) are written before rank 0 seals
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        metrics = getattr(t, "_metrics", {}).get("train", {})
        saved = {
            "global_step": state.global_step,
            "total_loss": t._total_loss_scalar,
            "window_start": t._globalstep_last_logged,
            "window_loss": partials,
            "tokens": getattr(t, "_total_train_tokens", None),
            "metrics": {k: list(v) for k, v in metrics.items()},
            "runtime_s": self.previous_runtime + time.time() - self.started,
            "peak_memory_gib": peak,
            "paused_s": self.previous_paused + self.paused,
        }
        (folder / STATE).write_text(json.dumps(saved) + "\n")
        write_manifest(folder)


def restore(trainer, saved: dict) -> None:
    rank = torch.distributed.get_rank() if distributed_initialized() else 0
    window = saved["window_loss"]
    world = torch.distributed.get_world_size() if distributed_initialized() else 1
    trainer._tr_loss.fill_(window[rank] if len(window) == world else sum(window) / len(window))
    trainer._total_loss_scalar = saved["total_loss"]
    trainer._globalstep_last_logged = saved["window_start"]
    trainer._initial_global_step = 0  # HF's train_loss divides by the steps of this call; the total spans the run
    if saved.get("tokens") is not None and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = saved["tokens"]
    if hasattr(trainer, "_metrics"):
        trainer._metrics["train"].clear()
        trainer._metrics["train"].update({k: list(v) for k, v in saved.get("metrics", {}).items()})


def attach(trainer, resume_from: Path | None, peak: Callable[[], float] | None = None) -> CarryState:
    carry = CarryState(trainer, resume_from, peak)
    trainer.add_callback(carry)  # appended: after guards.CheckpointRecipe writes recipe.yaml into the folder
    return carry


def _carry(trainer) -> CarryState | None:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CarryState)), None)


def carried_runtime(trainer) -> float:
    """Training seconds spent before this process resumed (0 for a fresh run)."""
    carry = _carry(trainer)
    return carry.previous_runtime if carry else 0.0


def paused_seconds(trainer, whole_run: bool = False) -> float:
    """Seconds of evaluation and checkpoint saving: this process's, or the whole run's (parts before a resume too)."""
    carry = _carry(trainer)
    if carry is None:
        return 0.0
    return carry.paused + (carry.previous_paused if whole_run else 0.0)


def run_peak_gib(trainer, this_part: float) -> float:
    """The whole run's peak memory per process: the highest of every rank's `this_part` and of the parts before a
    resume. Every rank must call it (a collective when distributed): the GPU that runs out is any rank's, not
    necessarily rank 0's, whose numbers the rest of run.json's memory shows."""
    carry = _carry(trainer)
    mine = max(this_part, carry.previous_peak) if carry else this_part
    return max(_per_rank(mine, trainer.args.device))


def resumed_at_step(trainer) -> int | None:
    """The checkpoint step this process resumed at, or None: run.json's wall_s and memory cover only what followed."""
    carry = _carry(trainer)
    return carry.resumed_at if carry else None


def is_done(folder: Path | None) -> bool:
    """Whether `folder` is the checkpoint of the run's last step (its trainer_state knows the planned total)."""
    if folder is None:
        return False
    try:
        state = json.loads((Path(folder) / "trainer_state.json").read_text())
        return 0 < int(state.get("max_steps") or 0) <= int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def train_or_finish(trainer, resume_from: Path | None, peak: Callable[[], float] | None = None):
    """trainer.train(), or, from the last step's checkpoint, the TrainOutput that train() would have ended with.

    `peak` gives this process's peak memory (GiB), which each checkpoint records for the parts after a resume.
    """
    carry = attach(trainer, resume_from, peak)
    if not is_done(resume_from):
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(str(resume_from))
    trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    trainer._tr_loss = torch.tensor(0.0, device=trainer.args.device)
    carry.resumed_at = trainer.state.global_step
    saved = read_state(resume_from) or {}
    if saved:
        carry.resume(saved)
    total = trainer._total_loss_scalar + float(trainer._tr_loss) if saved else float("nan")
    steps = trainer.state.global_step
    metrics = {"train_runtime": 0.0, "total_flos": trainer.state.total_flos, "train_loss": total / steps}
    trainer.model.train()  # TRL's log() files its metrics under "train" by the model's mode
    trainer.log(dict(metrics))  # the closing entry train() writes (with TRL's final token count)
    from transformers import ProgressCallback

    for callback in trainer.callback_handler.callbacks:  # plots and reporters close as after train(); no bar opened
        if not isinstance(callback, ProgressCallback):
            callback.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    return TrainOutput(steps, total / steps, metrics)
