"""Trainer callbacks a recipe turns on: one list, assembled here, handed to the TRL trainer.

Each concern lives in its own module (router telemetry, safety guards); this file only decides which
callbacks a run gets, so run.py stays a linear story.
"""

from __future__ import annotations

from pathlib import Path

from mixtral_ft.recipe import Recipe


def make_callbacks(recipe: Recipe, output_dir: Path) -> list:
    from mixtral_ft.train.guards import guard_callbacks
    from mixtral_ft.train.levers import lever_callbacks
    from mixtral_ft.train.telemetry import telemetry_callbacks

    callbacks: list = []
    if recipe.train.method == "dpo":  # first: later on_save callbacks see the checkpoint as it will stay
        from mixtral_ft.train.dpo import DropReferenceCopy

        callbacks.append(DropReferenceCopy())
    callbacks += guard_callbacks(recipe)  # NaN guard, SIGTERM/SIGINT checkpoints, recipe in checkpoints
    callbacks += lever_callbacks(recipe)  # skip_checkpoint_layers, reuse_dequantized: once checkpointing is on
    callbacks += telemetry_callbacks(recipe, output_dir)  # router stats, tokens/s, plots (call telemetry.attach)
    return callbacks
