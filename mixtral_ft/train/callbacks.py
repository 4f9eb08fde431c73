"""Trainer callbacks a recipe turns on: one list, assembled here, handed to the TRL trainer.

Each concern lives in its own module (router telemetry, safety guards); this file only decides which
callbacks a run gets, so run.py stays a linear story.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from mixtral_ft.recipe import Recipe


class LogLastStep(TrainerCallback):
    """Log the last step too: the Trainer logs every logging_steps only, so run.json's final_loss (and DPO's reward
    figures, and the loss curve) would otherwise end at the last multiple of logging_steps, not at the last step."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


def make_callbacks(recipe: Recipe, output_dir: Path) -> list:
    from mixtral_ft.train.guards import guard_callbacks
    from mixtral_ft.train.levers import lever_callbacks
    from mixtral_ft.train.telemetry import telemetry_callbacks

    callbacks: list = [LogLastStep()]
    if recipe.train.method == "dpo":  # first: later on_save callbacks see the checkpoint as it will stay
        from mixtral_ft.train.dpo import DropReferenceCopy

        callbacks.append(DropReferenceCopy())
    callbacks += guard_callbacks(recipe)  # NaN guard, SIGTERM/SIGINT checkpoints, recipe in checkpoints
    callbacks += lever_callbacks(recipe)  # skip_checkpoint_layers, reuse_dequantized: once checkpointing is on
    callbacks += telemetry_callbacks(recipe, output_dir)  # router stats, tokens/s, plots (call telemetry.attach)
    return callbacks
