"""Checkpoint discovery for `train.resume`: which `checkpoint-N` may be resumed from, decided before any heavy work.

`train.resume` takes four values:
  auto (default)  resume from the newest complete checkpoint in train.output_dir if there is one, else start fresh
  true            resume from the newest complete checkpoint; if there is none, that is an error
  false           never resume; an output_dir holding checkpoints of an unfinished run is an error
  PATH            resume from that checkpoint folder, which must be complete; later checkpoints in output_dir
                  (a rewind) are refused, or with train.overwrite deleted once the run starts
A run is finished once run.json exists (train/run.py writes it last); `train.overwrite` replaces a finished run only,
so a preempted job whose recipe says `overwrite: true` still resumes instead of starting over on every restart.

The HF Trainer's `get_last_checkpoint` trusts the folder name, so a save cut short by a preemption or a full
disk becomes the one it resumes from. Here a checkpoint is complete only when everything a resume reads is there
and intact: trainer_state.json parses; the adapter's safetensors header parses and the file holds all the data the
header promises; optimizer.pt, scheduler.pt and rng_state*.pth are whole zip archives (torch.save's format; a
truncated one loses its central directory, a corrupted one fails its CRC); and every file matches the SHA-256 in
the checkpoint's `checksums.sha256`, which is written last (checksums.py). Incomplete ones are skipped with a note.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mixtral_ft.common import is_main_process, world_size
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import Recipe, load_recipe
from mixtral_ft.train.carry import read_state
from mixtral_ft.train.checksums import manifest_problem, safetensors_problem, torch_file_problem
from mixtral_ft.train.outdir import defer_replace, deferred

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a run writes into output_dir only as it ends (save_outputs, the plots): found in a folder without checkpoints
# they are someone's files (a recipe kept beside its outputs, a README), not a run to resume.
END_FILES = (
    "README.md",
    "recipe.yaml",
    "run.json",
    "audit.json",
    "data_report.json",
    "adapter_config.json",
    "tokenizer_config.json",
    "loss_curve.png",
    "router_heatmap.png",
)
ADAPTER_FILES = ("adapter_model.safetensors", "model.safetensors")
TORCH_FILES = ("optimizer.pt", "scheduler.pt")
RUN_EXTRAS = ("tensorboard", "wandb", "eval.json")  # what a run may leave that the next one does not rewrite
# Keys that may differ between a checkpoint's recipe and the resuming one: where things go and how often they
# are logged or saved, and checks that stop a run before it starts. Every other key shapes the training
# trajectory, so changing it breaks an exact resume.
FREE_KEYS = {
    "train.output_dir",
    "train.resume",
    "train.overwrite",
    "train.save_steps",
    "train.save_total_limit",  # which old checkpoints are deleted, not what is trained
    "train.logging_steps",
    "train.eval_steps",
    "train.check_fit",
    "data.max_bad_fraction",  # only decides whether to stop: the rows kept are the same
    "data.num_proc",  # how many processes tokenize: the rows are the same
    "logging.report_to",
    "logging.project",
    "logging.run_name",
    "hub.push",
    "hub.repo_id",
    "hub.private",
}


def list_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders in `out`, newest (highest N) first."""
    if not out.is_dir():
        return []
    found = [(int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete."""
    if not folder.is_dir():
        return "not a folder"
    try:
        step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
        if not isinstance(step, int):
            raise TypeError
    except FileNotFoundError:
        return "no trainer_state.json (the save was cut short)"
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    weights = next((folder / n for n in ADAPTER_FILES if (folder / n).is_file()), None)
    if weights is None:
        return "no adapter_model.safetensors"
    problem = safetensors_problem(weights)
    if problem:
        return problem
    rng = sorted(folder.glob("rng_state*.pth"))
    ranks = sorted(int(m[1]) for p in rng if (m := re.match(r"rng_state_(\d+)\.pth$", p.name)))
    world = world_size()
    if not rng:
        return "no rng_state.pth"
    # One RNG file per rank: rank 0 writes trainer_state.json without waiting for the others.
    if ranks and (ranks != list(range(len(ranks))) or (world > 1 and len(ranks) < world)):
        return f"RNG states for ranks {ranks}, expected 0..{max(world, len(ranks)) - 1}"
    for name in [*TORCH_FILES, *(p.name for p in rng)]:
        problem = torch_file_problem(folder / name)
        if problem:
            return problem
    return manifest_problem(folder)  # written last by carry.CarryState: complete, and every byte as saved


def newest_complete(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in `out`, and the newer incomplete ones skipped on the way."""
    skipped = []
    for folder in list_checkpoints(out):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def check_existing_run(recipe: Recipe, out: Path) -> None:
    """Refuse to replace a finished run or to ignore an unfinished one; note what `train.overwrite` replaces."""
    t = recipe.train
    finished = (out / "run.json").exists()
    checkpoints = list_checkpoints(out)
    path_resume = isinstance(t.resume, str) and t.resume != "auto"
    if finished:
        if not t.overwrite:
            raise UserError(
                f"train.output_dir '{out}' already holds a run: choose a new folder, "
                "or set train.overwrite=true to replace it"
            )
        if t.resume is True:
            raise UserError(
                f"train.output_dir '{out}' holds a finished run, so there is nothing to resume: "
                "set train.resume=auto (or false) with train.overwrite=true to replace it"
            )
        _clear(out, [] if path_resume else checkpoints)
    elif checkpoints and t.resume is False:
        if not t.overwrite:
            raise UserError(
                f"train.output_dir '{out}' holds checkpoints of an unfinished run: set "
                "train.resume=auto to continue it, or train.overwrite=true to start over"
            )
        _clear(out, checkpoints)
    elif not checkpoints and (out / "adapter_model.safetensors").exists() and not t.overwrite:
        raise UserError(
            f"train.output_dir '{out}' already holds a run: choose a new folder, "
            "or set train.overwrite=true to replace it"
        )
    elif not checkpoints and not t.overwrite and (taken := [n for n in END_FILES if (out / n).exists()]):
        raise UserError(
            f"train.output_dir '{out}' holds {', '.join(taken)}, which the run would overwrite: choose a new "
            "or empty folder, or set train.overwrite=true to replace them"
        )


def _clear(out: Path, checkpoints: list[Path]) -> None:
    # Stale checkpoints of the replaced run would otherwise be what a later `resume: auto` picks up, and its logs
    # and eval.json would pass for the new run's. They go only once the new run has passed every check that can
    # fail with exit 2 (outdir.replace_deferred, from train/run.py). Every other file the new run rewrites.
    defer_replace(out, [*checkpoints, *(out / n for n in RUN_EXTRAS), out / "run.json"])


def _say(line: str) -> None:
    if is_main_process():
        print(line, flush=True)


def find_resume_checkpoint(recipe: Recipe, out: Path) -> Path | None:
    """The checkpoint `train.resume` asks for (None: start fresh); a UserError when it cannot be honoured."""
    resume = recipe.train.resume
    if resume is False:
        return None
    from_path = isinstance(resume, str) and resume != "auto"
    if from_path:
        folder = Path(resume).expanduser()
        if not folder.is_absolute() and not folder.exists() and (out / folder).is_dir():
            folder = out / folder  # `train.resume: checkpoint-N`: the run's own checkpoint
        problem = checkpoint_problem(folder)
        if problem:
            raise UserError(
                f"train.resume '{resume}' is not a complete checkpoint ({problem}): pass a "
                "checkpoint-N folder written by a run, or train.resume=auto"
            )
    else:
        replacing = any(p.name.startswith("checkpoint-") for p in deferred(out))  # train.overwrite replaces them
        folder, skipped = (None, []) if replacing else newest_complete(out)
        for bad, why in skipped:
            _say(f"resume: skipping incomplete {bad}: {why}")
        # Left there, a save cut short would count towards save_total_limit: the Trainer's rotation would delete the
        # complete checkpoint before it instead, leaving none to resume from until the next save is sealed.
        incomplete = [bad for bad, _ in skipped]
        defer_replace(out, incomplete, f"resume: removed {', '.join(p.name for p in incomplete)} (cut short)")
        if folder is None:
            if resume is True:
                raise UserError(
                    f"train.resume=true but train.output_dir '{out}' holds no complete checkpoint: "
                    "set train.resume=auto to start fresh, or pass a checkpoint folder"
                )
            return None
    check_same_recipe(folder, recipe)
    step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
    if from_path:
        _drop_later_steps(recipe, out, folder, step)
    _say(f"resume: continuing from {folder} (step {step})")
    _note_world_size(folder)
    return folder


def _drop_later_steps(recipe: Recipe, out: Path, folder: Path, step: int) -> None:
    """Rewinding (`train.resume: checkpoint-500` beside checkpoint-600) leaves the abandoned steps' folders, which
    a later `resume: auto` would take for this run's, and this run's saves would write into."""
    later = [p for p in list_checkpoints(out) if int(CHECKPOINT.match(p.name)[1]) > step]
    later = [p for p in later if p.resolve() != folder.resolve()]
    if later and not recipe.train.overwrite:
        raise UserError(
            f"train.resume '{recipe.train.resume}' goes back to step {step}, but '{out}' also holds "
            f"{', '.join(p.name for p in reversed(later))} from later steps: move them out of the folder, "
            "or set train.overwrite=true to delete them once the run has started (if this run saved them after "
            "going back, e.g. a preempted job restarting, set train.resume=auto to continue from the newest)"
        )
    defer_replace(out, deferred(out) + later)


def _note_world_size(folder: Path) -> None:
    # Allowed (a preempted 8-GPU job may come back on 4), but the global batch and each rank's data shard change,
    # so the rest of the run is not the one an uninterrupted run would have trained: say so.
    saved = read_state(folder) or {}
    before, now = len(saved.get("window_loss") or []), world_size()
    if before and before != now:
        _say(
            f"resume: note: {folder.name} was written by {before} process(es) and this run has {now}: the global "
            f"batch changes by {now}/{before}, so the rest of the run differs from an uninterrupted one"
        )


def check_same_recipe(folder: Path, recipe: Recipe) -> None:
    """A checkpoint resumes only the recipe that wrote it (guards.CheckpointRecipe saves that recipe beside it)."""
    saved = folder / "recipe.yaml"
    if not saved.is_file():
        return  # written by a plain HF Trainer or cut short before the recipe: nothing to compare with
    before = _saved_recipe(saved)
    if before is None:
        return
    now = _flat(recipe.to_dict())
    changed = [
        f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(before) | set(now))
        if k not in FREE_KEYS and before.get(k) != now.get(k)
    ]
    if changed:
        raise UserError(
            f"checkpoint '{folder}' was written by a different recipe ({'; '.join(changed[:3])}): "
            "restore those values to resume it, or use a new train.output_dir"
        )


def _saved_recipe(saved: Path) -> dict | None:
    """The checkpoint's recipe, flat, with today's defaults for keys added since it was written (they did not
    exist then, so the run used what their default does); as written if today's rules reject it."""
    try:
        return _flat(load_recipe(saved).to_dict())
    except UserError:
        pass
    try:
        return _flat(yaml.safe_load(saved.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out
