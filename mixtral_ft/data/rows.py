"""The rows a recipe trains on, one function per `train.method`: what `train` hands TRL and `mixtral-ft data` shows.

Both commands call these, so the preview is the training data itself, read from the same tokenized cache.
"""

from __future__ import annotations

from mixtral_ft.data.sources import SFTData
from mixtral_ft.recipe import Recipe


def sft_rows(recipe: Recipe, tokenizer) -> SFTData:
    from mixtral_ft.data.conversations import load_sft_data

    t = recipe.train
    data = load_sft_data(
        recipe.data, tokenizer, max_length=t.max_length, seed=t.seed, assistant_only=t.assistant_only_loss
    )
    if not t.assistant_only_loss:  # TRL builds the labels from an `assistant_masks` column whenever present
        data.train = data.train.remove_columns("assistant_masks")
        data.eval = data.eval.remove_columns("assistant_masks") if data.eval is not None else None
    return data


def dpo_rows(recipe: Recipe, tokenizer) -> SFTData:
    from mixtral_ft.data.prefs import load_preference_data

    t = recipe.train
    return load_preference_data(
        recipe.data, tokenizer, max_length=t.max_length, max_prompt_length=recipe.dpo.max_prompt_length, seed=t.seed
    )


ROWS = {"sft": sft_rows, "dpo": dpo_rows}  # train.method -> (recipe, tokenizer) -> SFTData
