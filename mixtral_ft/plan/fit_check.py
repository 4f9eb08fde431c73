"""Before `train` downloads or loads anything: can this machine train the recipe's model at all?

A full Mixtral needs a CUDA GPU with room for plan's estimate; without that the run would spend minutes (or a
93 GB download) before failing. One line says why and what to run instead. `--force` or
`train.check_fit: false` skips the check (e.g. for a CPU box with lots of memory, or an estimate you doubt).
"""

from __future__ import annotations

from mixtral_ft.common import why_no_cuda, world_size
from mixtral_ft.errors import UserError

CPU_LIMIT_GIB = 8.0  # above this predicted peak, a CPU run is hopeless (the tiny model needs ~0.01 GiB)


def gpu_memory_gib() -> float | None:
    """Memory of CUDA device 0 in GiB, or None without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def verdict(recipe, recipe_path: str, gpu_mem: float | None) -> str | None:
    """Why this machine cannot train the recipe (one line), or None if it can or we cannot tell."""
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
            f"{why_no_cuda()}; stopped before any download. On CPU try `mixtral-ft train recipes/tiny.yaml`; "
            f"size a GPU with `mixtral-ft plan {recipe_path}`; {override}"
        )
    if report["fits"]:
        return None
    return (
        f"{recipe.model.name} does not fit this GPU: plan predicts {need:.1f} GiB at peak, the GPU has "
        f"{gpu_mem:.0f} GiB; stopped before any download. Run `mixtral-ft plan {recipe_path} --gpu-mem "
        f"{gpu_mem:.0f}` for settings that fit; {override}"
    )


def check_can_train(recipe, recipe_path: str, *, force: bool = False) -> None:
    """UserError (exit 2) when the model cannot train on this machine; nothing is downloaded or written first."""
    if force or not recipe.train.check_fit or world_size() > 1:
        return  # launched workers: the per-process share (DDP, FSDP) is plan's business with --num-gpus
    why = verdict(recipe, recipe_path, gpu_memory_gib())
    if why:
        raise UserError(why)
