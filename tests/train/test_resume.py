"""Finding a checkpoint to resume and the output folder's rules, on hand-made checkpoints (no training)."""

from pathlib import Path

import pytest

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe
from mixtral_ft.train.outdir import replace_deferred
from mixtral_ft.train.resume import (
    check_existing_run,
    checkpoint_problem,
    find_resume_checkpoint,
    newest_complete,
)
from tests.conftest import TINY_RECIPE, make_checkpoint


def recipe_for(out: Path, *overrides: str):
    return load_recipe(TINY_RECIPE, [f"train.output_dir={out}", *overrides])


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: (f / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda f: (f / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is unreadable"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda f: truncate(f / "adapter_model.safetensors", 0.9), "adapter_model.safetensors is truncated"),
        (
            lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 3),
            "adapter_model.safetensors is unreadable",
        ),
        (lambda f: (f / "optimizer.pt").unlink(), "no optimizer.pt"),
        (lambda f: truncate(f / "optimizer.pt"), "optimizer.pt is truncated"),
        (lambda f: (f / "scheduler.pt").write_bytes(b""), "scheduler.pt is empty"),
        (lambda f: (f / "rng_state.pth").unlink(), "no rng_state.pth"),
        (lambda f: (f / "rng_state.pth").rename(f / "rng_state_1.pth"), "RNG states for ranks [1]"),
    ],
)
def test_incomplete_checkpoints_are_skipped_with_a_reason(tmp_path, damage, problem, capsys):
    out = tmp_path / "run"
    good = make_checkpoint(out, 2)
    bad = make_checkpoint(out, 4)
    damage(bad)
    assert problem in checkpoint_problem(bad)
    assert newest_complete(out) == (good, [(bad, checkpoint_problem(bad))])
    assert find_resume_checkpoint(recipe_for(out), out) == good
    printed = capsys.readouterr().out
    assert f"resume: skipping incomplete {bad}: {problem}" in printed
    assert f"resume: continuing from {good} (step 2)" in printed


def test_corrupted_torch_file_fails_its_crc(tmp_path):
    folder = make_checkpoint(tmp_path, 1)
    data = bytearray((folder / "optimizer.pt").read_bytes())
    start = data.find(b"param_groups")  # inside the pickled payload, a stored (uncompressed) zip member
    data[start : start + 4] = b"XXXX"
    (folder / "optimizer.pt").write_bytes(bytes(data))
    assert checkpoint_problem(folder) == "optimizer.pt is corrupted"


def test_resume_modes(tmp_path, capsys):
    empty, out = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    assert find_resume_checkpoint(recipe_for(empty), empty) is None  # auto, nothing there: fresh start
    with pytest.raises(UserError, match="train.resume=true but .* holds no complete checkpoint"):
        find_resume_checkpoint(recipe_for(empty, "train.resume=true"), empty)
    partial = make_checkpoint(out, 3)
    (partial / "optimizer.pt").unlink()
    assert find_resume_checkpoint(recipe_for(out), out) is None  # auto with only a partial one: fresh start
    with pytest.raises(UserError, match=r"is not a complete checkpoint \(no optimizer.pt\)"):
        find_resume_checkpoint(recipe_for(out, f"train.resume={partial}"), out)
    elsewhere = make_checkpoint(tmp_path / "old", 5)
    assert find_resume_checkpoint(recipe_for(out, f"train.resume={elsewhere}"), out) == elsewhere
    assert find_resume_checkpoint(recipe_for(out, "train.resume=false"), out) is None
    capsys.readouterr()


def test_a_checkpoint_resumes_only_the_recipe_that_wrote_it(tmp_path):
    out = tmp_path / "run"
    make_checkpoint(out, 2)
    with pytest.raises(UserError, match=r"different recipe \(lora.r: 16 -> 8; train.learning_rate: 0.005 -> 0.001\)"):
        find_resume_checkpoint(recipe_for(out, "lora.r=8", "train.learning_rate=1e-3"), out)
    # Where it saves and how often it logs may change.
    assert (
        find_resume_checkpoint(recipe_for(out, "train.save_steps=7", "train.logging_steps=3"), out)
        == out / "checkpoint-2"
    )


def test_where_a_run_reports_may_change_on_resume(tmp_path):
    """Reporters, the fit check and the bad-row limit do not shape the trajectory: adding wandb to a preempted run
    (or --force's train.check_fit=false) must not be refused."""
    out = tmp_path / "run"
    make_checkpoint(out, 2)
    changed = ("logging.report_to=[tensorboard]", "logging.project=p", "logging.run_name=r", "train.check_fit=false")
    assert find_resume_checkpoint(recipe_for(out, *changed, "data.max_bad_fraction=0.5"), out) == out / "checkpoint-2"


def test_resume_names_a_checkpoint_in_the_output_dir(tmp_path, monkeypatch):
    """`train.resume: checkpoint-N` (as README's table writes it) is the run's own checkpoint, from any folder."""
    out = tmp_path / "run"
    folder = make_checkpoint(out, 2)
    monkeypatch.chdir(tmp_path)
    assert find_resume_checkpoint(recipe_for(out, "train.resume=checkpoint-2"), out) == folder


def test_resuming_with_another_number_of_processes_is_noted(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    folder = make_checkpoint(out, 2)
    (folder / "mixtral_ft_state.json").write_text('{"global_step": 2, "window_loss": [1.0, 2.0]}')
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert find_resume_checkpoint(recipe_for(out), out) == folder
    assert "note" not in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert find_resume_checkpoint(recipe_for(out), out) == folder
    assert "checkpoint-2 was written by 2 process(es) and this run has 1" in capsys.readouterr().out


def test_a_checkpoint_from_before_a_new_recipe_key_still_resumes(tmp_path):
    """Keys added since (train.liger, say) were not there when it was written: their default is what it ran."""
    import yaml

    from mixtral_ft.train.checksums import write_manifest

    out = tmp_path / "run"
    saved = make_checkpoint(out, 2) / "recipe.yaml"
    old = yaml.safe_load(saved.read_text())
    for key in ("liger", "reuse_dequantized", "skip_checkpoint_layers", "compile"):
        del old["train"][key]
    saved.write_text(yaml.safe_dump(old))
    write_manifest(saved.parent)  # as it was written then: intact
    assert find_resume_checkpoint(recipe_for(out), out) == out / "checkpoint-2"
    with pytest.raises(UserError, match=r"different recipe \(train.liger: False -> True\)"):
        find_resume_checkpoint(recipe_for(out, "train.liger=true"), out)


def test_output_dir_rules(tmp_path):
    out = tmp_path / "run"
    make_checkpoint(out, 2)
    with pytest.raises(
        UserError,
        match="holds checkpoints of an unfinished run: set train.resume=auto to continue "
        "it, or train.overwrite=true to start over",
    ):
        check_existing_run(recipe_for(out, "train.resume=false"), out)
    check_existing_run(recipe_for(out), out)  # auto: resumable, nothing touched
    assert (out / "checkpoint-2").is_dir()
    (out / "run.json").write_text("{}")  # now a finished run
    with pytest.raises(UserError, match="already holds a run"):
        check_existing_run(recipe_for(out), out)
    with pytest.raises(UserError, match="nothing to resume"):
        check_existing_run(recipe_for(out, "train.resume=true", "train.overwrite=true"), out)
    # overwrite replaces a finished run: its checkpoints go too, or a later resume would pick them up.
    check_existing_run(recipe_for(out, "train.overwrite=true"), out)
    assert (out / "run.json").exists() and (out / "checkpoint-2").is_dir()  # nothing goes before the run starts
    replace_deferred(out)
    assert list(out.iterdir()) == []


def test_overwrite_replaces_the_previous_runs_logs_and_eval(tmp_path):
    """Its tensorboard events would mix into the new run's curves, and eval.json scored the old adapter; the
    closing line and a push would pass them off as the new run's. A user's own file stays."""
    out = tmp_path / "run"
    make_checkpoint(out, 2)
    (out / "run.json").write_text("{}")
    (out / "eval.json").write_text("{}")
    for logs in ("tensorboard", "wandb/offline-run-1"):
        (out / logs).mkdir(parents=True)
        (out / logs / "events").write_text("old")
    (out / "notes.txt").write_text("mine")
    check_existing_run(recipe_for(out, "train.overwrite=true"), out)
    replace_deferred(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_does_not_restart_an_unfinished_run_that_can_resume(tmp_path):
    # A preemptible job whose recipe says overwrite: true must make progress across restarts.
    out = tmp_path / "run"
    make_checkpoint(out, 4)
    check_existing_run(recipe_for(out, "train.overwrite=true"), out)
    assert find_resume_checkpoint(recipe_for(out, "train.overwrite=true"), out) == out / "checkpoint-4"


def test_only_rank_zero_clears_a_replaced_run(tmp_path, monkeypatch):
    # Every rank runs the output-dir check; one deletes, the others only decide (to start fresh).
    out = tmp_path / "run"
    make_checkpoint(out, 1)
    (out / "run.json").write_text("{}")
    monkeypatch.setenv("RANK", "1")
    check_existing_run(recipe_for(out, "train.overwrite=true"), out)
    replace_deferred(out)
    assert (out / "checkpoint-1").is_dir() and (out / "run.json").exists()
