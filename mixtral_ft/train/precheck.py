"""The checks `train` can make in a fraction of a second, before torch and transformers load (seconds).

load_recipe has checked the recipe; this checks what the recipe points at that needs no library: each local data
file exists, has a supported extension and, for JSON Lines, starts with valid UTF-8 JSON rows of bounded size (a
first pass over at most `FIRST_PASS_BYTES`: the full pass comes when the data loads); a model.adapter folder holds
an adapter; with hub.push, that a Hugging Face token exists; with `train.compile`, that this torch can compile the
layers (the one check that imports torch). The output folder is checked and locked by outdir.claimed.
"""

from __future__ import annotations

from mixtral_ft.data.files import check_file_source, locate
from mixtral_ft.errors import UserError
from mixtral_ft.model.source import check_adapter_folder, read_adapter_config
from mixtral_ft.recipe import LoraSection, Recipe

FIRST_PASS_BYTES = 64 * 2**20
# lora.* keys that shape an adapter, and their adapter_config.json names (allow_other_targets only permits).
ADAPTER_KEYS = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "target_modules",
    "use_rslora": "use_rslora",
}


def precheck(recipe: Recipe) -> None:
    check_data(recipe)
    if recipe.model.adapter:
        check_adapter_folder(recipe.model.adapter)
        _check_lora_unused(recipe)
    if recipe.hub.push:
        _check_token(recipe.train.output_dir)
    if recipe.train.compile:
        from mixtral_ft.model.grouped_gemm import compile_problem  # imports torch: only when it is needed

        if problem := compile_problem("train.compile", "set train.compile=false"):
            raise UserError(problem)


def _check_lora_unused(recipe: Recipe) -> None:
    """model.adapter trains with the adapter's own LoRA settings: a lora.* value set to another would be ignored.

    Values equal to the defaults pass (a resolved recipe.yaml lists them all), as do values equal to the adapter's.
    """
    adapter, defaults = recipe.model.adapter, LoraSection()
    config = read_adapter_config(adapter)
    for key, field in ADAPTER_KEYS.items():
        if key == "dropout" and recipe.train.method == "dpo":
            continue  # TRL's DPO runs without dropout whatever either says: tiny_dpo.yaml's 0.0 serves both cases
        given, default, theirs = (
            _same_order(v) for v in (getattr(recipe.lora, key), getattr(defaults, key), config.get(field))
        )
        if given != default and given != theirs:
            raise UserError(
                f"lora.{key} ({given}) is not used with model.adapter: training continues '{adapter}' with its own "
                f"LoRA settings ({field}: {theirs}); remove lora.{key}, or drop model.adapter to train a new adapter"
            )


def _same_order(value):
    """Target lists compare as sets (peft stores them in its own order)."""
    return sorted(value) if isinstance(value, list | tuple) else value


def _check_token(output_dir: str) -> None:
    """hub.push needs a token at the end of training: without one, say so now, not after hours of training."""
    from huggingface_hub import get_token  # the environment or the login cache: no request

    if not get_token():
        raise UserError(
            "hub.push is true but there is no Hugging Face token: set HF_TOKEN or run `hf auth login` first, or "
            f"set hub.push=false and push later with `mixtral-ft push {output_dir} --repo-id ...`"
        )


def check_data(recipe: Recipe) -> None:
    """Each data source of the recipe (`mixtral-ft data` makes this check alone: it trains nothing)."""
    d = recipe.data
    sources = [(d.path, d.split)] if d.path is not None else [(s.path, s.split) for s in d.mixture]
    for path, split in sources:
        _check_source(path, split)


def _check_source(path: str, split: str) -> None:
    kind, local = locate(path)
    if kind == "file" and not path.startswith("builtin:"):
        check_file_source(local, path, split, max_bytes=FIRST_PASS_BYTES)
