"""Before `train` (or `chat`, `eval`) downloads or loads anything: can this machine run the model at all?

A full Mixtral needs a CUDA GPU with room for plan's estimate; without that the run would spend minutes (or a
93 GB download) before failing. One line says why and what to run instead. `--force` or
`train.check_fit: false` skips the check (e.g. for a CPU box with lots of memory, or an estimate you doubt).
"""

from __future__ import annotations

from mixtral_ft.common import why_no_cuda, world_size
from mixtral_ft.errors import UserError

CPU_LIMIT_GIB = 8.0  # above this predicted peak, a CPU run is hopeless (the tiny model needs ~0.01 GiB)


def tiny_recipe() -> str:
    """recipes/tiny.yaml as a path that works from here: relative inside the clone, else absolute."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
    if not path.is_file():  # installed without the repository's recipes
        return "recipes/tiny.yaml (from the mixtral_ft repository)"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def gpu_memory_gib() -> float | None:
    """Memory of CUDA device 0 in GiB, or None without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def verdict(recipe, recipe_path: str, gpu_mem: float | None, *, sharded: bool = False) -> str | None:
    """Why this machine cannot train the recipe (one line), or None if it can or we cannot tell.

    `sharded`: FSDP or ZeRO-3 will split the weights over the GPUs, so only the no-GPU case is judged here (the
    per-GPU share is `mixtral-ft plan --num-gpus N`'s); DDP keeps the whole model on each GPU, as one process."""
    from mixtral_ft.model.tiny import TINY_NAME
    from mixtral_ft.plan.preflight import plan

    if recipe.model.name == TINY_NAME:
        return None
    try:
        report = plan(recipe, gpu_mem=gpu_mem or 80.0)
    except UserError:  # no shape to estimate from: leave the verdict to loading the model
        return None
    need = report["peak_gib"]
    override = "--force (or train.check_fit: false) to try anyway"
    if gpu_mem is None:
        if need <= CPU_LIMIT_GIB:
            return None
        return (
            f"{recipe.model.name} needs a CUDA GPU (plan: {need:.1f} GiB at peak) and torch sees none: "
            f"{why_no_cuda()}; stopped before any download. On CPU try `mixtral-ft train {tiny_recipe()}`; "
            f"size a GPU with `mixtral-ft plan {recipe_path}`; {override}"
        )
    if report["fits"] or sharded:
        return None
    return (
        f"{recipe.model.name} does not fit this GPU: plan predicts {need:.1f} GiB at peak, the GPU has "
        f"{gpu_mem:.0f} GiB; stopped before any download. Run `mixtral-ft plan {recipe_path} --gpu-mem "
        f"{gpu_mem:.0f}` for settings that fit; {override}"
    )


def check_can_train(recipe, recipe_path: str, *, force: bool = False, sharded: bool = False) -> None:
    """UserError (exit 2) when the model cannot train on this machine; nothing is downloaded or written first.

    Under `--num-processes N` the launching command checks once (`sharded`: see verdict), before N workers start."""
    if force or not recipe.train.check_fit or world_size() > 1:
        return  # a launched worker: the launching command has checked
    why = verdict(recipe, recipe_path, gpu_memory_gib(), sharded=sharded)
    if why:
        raise UserError(why)


# --- chat and eval: the weights alone must fit, and a CPU only serves small models --------------------------


def inference_weights_gib(dims, *, quantize: bool, quantize_experts: bool = True) -> float:
    """The loaded weights of a model for chat/eval: mixtral_ft's NF4 load, or (--no-quantize) all of it in bf16."""
    from mixtral_ft.plan.inputs import Run
    from mixtral_ft.plan.peak import estimate

    if quantize:
        return estimate(dims, Run(batch=1, seq=1, quantize_experts=quantize_experts)).weights / 2**30
    d = dims
    attention = 2 * d.hidden * (d.heads + d.kv_heads) * d.head_dim
    layer = attention + d.experts * (3 * d.inter + 1) * d.hidden + 2 * d.hidden  # experts, router, norms
    params = d.layers * layer + d.vocab * d.hidden * (1 if d.tied else 2) + d.hidden
    return 2 * params / 2**30


def serve_verdict(name: str, revision: str | None, gpu_mem: float | None, *, command: str, **how) -> str | None:
    """Why `command` (chat, eval) cannot hold model `name` here (one line), or None if it can or we cannot tell.

    `how`: inference_weights_gib's quantize and quantize_experts. Without --no-quantize the whole model goes
    on the GPU; with it, transformers' device_map="auto" spills what does not fit to the CPU, so only the
    no-GPU case is refused.
    """
    from mixtral_ft.model.tiny import TINY_NAME
    from mixtral_ft.plan.preflight import load_dims

    if name == TINY_NAME:
        return None
    try:
        dims, prequantized_experts, _ = load_dims(name, revision)
    except UserError:  # no config to size it by: loading the model says what is wrong
        return None
    if prequantized_experts is not None:
        how["quantize_experts"] = prequantized_experts
    need = inference_weights_gib(dims, **how)
    form = "bf16" if not how["quantize"] else "NF4" if how.get("quantize_experts", True) else "NF4, experts bf16"
    weights = f"{name}'s weights take {need:.1f} GiB ({form})"
    force = f"pass --force to {command} anyway"
    here = "`mixtral-ft chat tiny` runs here; " if command == "chat" else ""
    if gpu_mem is None:
        if need <= CPU_LIMIT_GIB:
            return None
        return (
            f"{weights} and torch sees no CUDA GPU: {why_no_cuda()}; a CPU would be far too slow, so "
            f"{command} stopped before any download. {here}{force}"
        )
    if not how["quantize"] or need <= gpu_mem - 1.0:  # the CUDA context and the KV cache need some room
        return None
    return f"{weights}, more than this {gpu_mem:.0f} GiB GPU holds: {command} stopped before any download; {force}"


def check_can_serve(name: str, revision: str | None, *, command: str, force: bool = False, **how) -> None:
    """UserError (exit 2) when chat/eval cannot hold the model here; nothing is downloaded first."""
    if force:
        return
    why = serve_verdict(name, revision, gpu_memory_gib(), command=command, **how)
    if why:
        raise UserError(why)
