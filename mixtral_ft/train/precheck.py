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
from mixtral_ft.model.source import check_adapter_folder
from mixtral_ft.recipe import Recipe

FIRST_PASS_BYTES = 64 * 2**20


def precheck(recipe: Recipe) -> None:
    d = recipe.data
    sources = [(d.path, d.split)] if d.path is not None else [(s.path, s.split) for s in d.mixture]
    for path, split in sources:
        _check_source(path, split)
    if recipe.model.adapter:
        check_adapter_folder(recipe.model.adapter)
    if recipe.hub.push:
        _check_token(recipe.train.output_dir)
    if recipe.train.compile:
        from mixtral_ft.model.grouped_gemm import compile_problem  # imports torch: only when it is needed

        if problem := compile_problem("train.compile", "set train.compile=false"):
            raise UserError(problem)


def _check_token(output_dir: str) -> None:
    """hub.push needs a token at the end of training: without one, say so now, not after hours of training."""
    from huggingface_hub import get_token  # the environment or the login cache: no request

    if not get_token():
        raise UserError(
            "hub.push is true but there is no Hugging Face token: set HF_TOKEN or run `hf auth login` first, or "
            f"set hub.push=false and push later with `mixtral-ft push {output_dir} --repo-id ...`"
        )


def _check_source(path: str, split: str) -> None:
    kind, local = locate(path)
    if kind == "file" and not path.startswith("builtin:"):
        check_file_source(local, path, split, max_bytes=FIRST_PASS_BYTES)
