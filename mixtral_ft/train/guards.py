"""Safety callbacks for long runs on preemptible machines: SIGTERM/SIGINT checkpoints, a NaN guard, recipes.

- `PreemptionGuard`: the signal handler only sets a flag. At the next optimizer-step boundary every rank agrees
  (an all-reduce of the flag), the Trainer saves a full checkpoint (adapter, optimizer, scheduler, RNG states and
  the step, from which it finds its place in the data) and stops; `run_trainer` then raises `Preempted`, which
  the CLI turns into exit 143 (SIGTERM) or 130 (SIGINT). A second Ctrl-C aborts at once, without a checkpoint.
  The handlers stay installed through the final save, so a signal as the run ends cannot leave it half-written.
- `NanGuard`: a non-finite gradient norm (checked before the optimizer step, so the weights are never poisoned)
  or a non-finite logged loss stops the run with `TrainingError` naming the step (exit 1). Nothing is saved after
  it, so the newest checkpoint is the last good one. sft_config turns off the Trainer's `logging_nan_inf_filter`,
  which would otherwise log the running average in place of a NaN.
- `CheckpointRecipe`: writes the recipe into each checkpoint, so a resume can refuse a changed recipe.
"""

from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from mixtral_ft.common import distributed_initialized
from mixtral_ft.recipe import Recipe, dump_recipe

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingError(Exception):
    """Training itself went wrong (not the user's input): the CLI prints one line and exits 1."""


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _all_reduce(value: float, device, op: str) -> float:
    """`op` ("max" or "sum") of `value` over all ranks; every rank must call this at the same point."""
    if not distributed_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float32, device=device)  # NCCL needs it on the rank's GPU
    torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return float(tensor.item())


class PreemptionGuard(TrainerCallback):
    def __init__(self):
        self.received = 0  # the signal number seen by the handler, 0 for none
        self.stopped = None  # (signum, step) once a checkpoint was requested for it

    @contextmanager
    def installed(self):
        """The handlers, for the duration of trainer.train() only (restored even when training raises)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # Python lets only the main thread set handlers; default signal behaviour then applies
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        # Only a flag: the step in flight finishes, and printing here could re-enter a half-written stdout.
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user wants out now
        self.received = max(self.received, signum)  # SIGTERM (15) outranks SIGINT (2): the scheduler wins

    def on_step_end(self, args, state, control, **kwargs):
        # Ranks see signals at different moments; MAX makes all of them stop (and save) at the same step.
        signum = int(_all_reduce(self.received, args.device, "max"))
        if signum and self.stopped is None:
            self.stopped = (signum, state.global_step)
            control.should_save = True
            control.should_training_stop = True
            # No extra log entry: carry.CarryState saves the open logging window's loss with the checkpoint, so
            # the resumed run logs the same windows as an uninterrupted one.
            control.should_evaluate = False  # the grace period is for saving
            if state.is_world_process_zero:
                print(
                    f"received {signal.Signals(signum).name}: saving checkpoint-{state.global_step} and stopping",
                    flush=True,
                )
        return control


class NanGuard(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return  # fp16's loss scaler makes inf gradients routine (it skips those steps); the loss check remains
        grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
        local = torch.stack([g.pow(2).sum() for g in grads]).sum().item() if grads else 0.0
        sq = _all_reduce(local, args.device, "sum")
        if not math.isfinite(sq):
            _diverged(args, state.global_step + 1, "the gradient norm", math.sqrt(sq))

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm") if not args.fp16 else ("loss",):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                _diverged(args, state.global_step, f"the {key.replace('_', ' ')}", value)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Belt and braces before a save: never write a checkpoint whose trainable weights are not finite.
        if control.should_save and model is not None:
            bad = any(not torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
            if _all_reduce(float(bad), args.device, "max"):
                _diverged(args, state.global_step, "a trainable weight", float("nan"))


def _diverged(args, step: int, what: str, value: float) -> None:
    from mixtral_ft.train.resume import newest_complete

    last, _ = newest_complete(Path(args.output_dir))
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    raise TrainingError(
        f"training diverged at step {step}: {what} is {value}; {kept}. Lower train.learning_rate "
        f"(now {args.learning_rate:g}) or train.max_grad_norm, or check the data, then start again "
        "(train.resume=false train.overwrite=true) or go on from a checkpoint's weights in a new "
        "output_dir (model.adapter=CHECKPOINT)"
    )


class CheckpointRecipe(TrainerCallback):
    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                dump_recipe(self.recipe, folder / "recipe.yaml")


def guard_callbacks(recipe: Recipe) -> list:
    # PreemptionGuard first: NanGuard's finite-weights check then also covers the save a signal asks for.
    return [PreemptionGuard(), NanGuard(), CheckpointRecipe(recipe)]


def run_trainer(trainer, resume_from: Path | None, finish, peak=None) -> tuple:
    """trainer.train(), then `finish(result)` (the final save), with the signal handlers installed throughout.

    Raises `Preempted` once a mid-run signal's checkpoint is saved. A signal after the last step does not cut
    the final save short: it completes, and `(finish's value, signum)` tells the caller (0: no signal). `peak`
    gives this process's peak memory, which checkpoints carry (carry.py).
    """
    from mixtral_ft.train.carry import train_or_finish

    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PreemptionGuard))
    try:
        with guard.installed():
            result = train_or_finish(trainer, resume_from, peak)  # from the last step's checkpoint: no extra step
            if not guard.stopped:
                value = finish(result)
                # ranks may see a late signal or not: agree, so that all exit alike
                late = int(_all_reduce(guard.received, trainer.args.device, "max"))
    except Exception:  # diverged, or a full disk (fsio.py)
        for callback in trainer.callback_handler.callbacks:  # end the progress bar's line, so that the
            bar = getattr(callback, "training_bar", None)  # error line the CLI prints starts a line of its own
            if bar is not None:
                bar.close()
                callback.training_bar = None
        raise
    if guard.stopped:
        signum, step = guard.stopped
        if distributed_initialized():
            torch.distributed.barrier()  # no rank exits (and gets the others killed) before all have saved
        folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        raise Preempted(
            f"{signal.Signals(signum).name} received: saved {folder} at step {step}; run the same "
            "command again to resume (train.resume: auto)",
            signum,
        )
    return value, late
