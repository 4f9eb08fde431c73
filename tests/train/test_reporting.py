"""A resumed run continues its wandb run: the id picked from OUTPUT_DIR/wandb, then one interrupted tiny run
(wandb offline) resumed for real."""

import json
import os
import signal
from pathlib import Path

import pytest

from mixtral_ft.recipe import load_recipe
from mixtral_ft.train.reporting import newest_wandb_id, wandb_resume_env, wandb_session
from tests.conftest import TINY_RECIPE, signal_at, train
from tests.train.test_run_reports import _wandb_records


def wandb_folder(out: Path, name: str, run_id: str) -> Path:
    folder = out / "wandb" / name
    folder.mkdir(parents=True)
    (folder / f"run-{run_id}.wandb").write_bytes(b":W&B")
    return folder


@pytest.fixture
def no_user_id(monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def test_the_newest_wandb_run_is_the_one_continued(tmp_path):
    out = tmp_path / "run"
    assert newest_wandb_id(out) is None  # no wandb/ at all
    (out / "wandb").mkdir(parents=True)
    assert newest_wandb_id(out) is None
    older = wandb_folder(out, "offline-run-20260101_100000-aaaa1111", "aaaa1111")
    wandb_folder(out, "run-20260102_090000-bbbb2222", "bbbb2222")  # an online run's folder counts too
    assert newest_wandb_id(out) == "bbbb2222"
    # A user-chosen id with hyphens, started twice in one second (wandb then adds -1): the id is the file's.
    wandb_folder(out, "offline-run-20260103_080000-my-run", "my-run")
    wandb_folder(out, "offline-run-20260103_080000-my-run-1", "my-run")
    (out / "wandb" / "latest-run").symlink_to(older)  # wandb's link is no run of its own
    assert newest_wandb_id(out) == "my-run"


def test_only_a_resume_from_this_output_dir_continues_its_wandb_run(tmp_path, no_user_id):
    out = tmp_path / "run"
    wandb_folder(out, "offline-run-20260101_100000-aaaa1111", "aaaa1111")
    recipe = load_recipe(TINY_RECIPE, [f"train.output_dir={out}", "logging.report_to=[wandb]"])
    assert wandb_resume_env(recipe, out, out / "checkpoint-3") == {"WANDB_RUN_ID": "aaaa1111", "WANDB_RESUME": "allow"}
    assert wandb_resume_env(recipe, out, None) == {}  # a fresh run: wandb picks a new id
    assert wandb_resume_env(recipe, out, tmp_path / "other" / "checkpoint-3") == {}  # another run's checkpoint
    assert wandb_resume_env(recipe, tmp_path / "empty", tmp_path / "empty" / "checkpoint-3") == {}  # no wandb/
    no_wandb = load_recipe(TINY_RECIPE, [f"train.output_dir={out}", "logging.report_to=[tensorboard]"])
    assert wandb_resume_env(no_wandb, out, out / "checkpoint-3") == {}


def test_the_run_id_is_set_during_training_only_and_the_users_own_wins(tmp_path, monkeypatch, no_user_id):
    out = tmp_path / "run"
    wandb_folder(out, "offline-run-20260101_100000-aaaa1111", "aaaa1111")
    recipe = load_recipe(TINY_RECIPE, [f"train.output_dir={out}", "logging.report_to=[wandb]"])
    with wandb_session(recipe, out, out / "checkpoint-3"):
        assert (os.environ["WANDB_RUN_ID"], os.environ["WANDB_RESUME"]) == ("aaaa1111", "allow")
    assert "WANDB_RUN_ID" not in os.environ and "WANDB_RESUME" not in os.environ

    monkeypatch.setenv("WANDB_RESUME", "must")
    with wandb_session(recipe, out, out / "checkpoint-3"):
        assert (os.environ["WANDB_RUN_ID"], os.environ["WANDB_RESUME"]) == ("aaaa1111", "must")
    assert os.environ["WANDB_RESUME"] == "must" and "WANDB_RUN_ID" not in os.environ

    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    assert wandb_resume_env(recipe, out, out / "checkpoint-3") == {}
    with wandb_session(recipe, out, out / "checkpoint-3"):
        assert os.environ["WANDB_RUN_ID"] == "mine"
    assert os.environ["WANDB_RUN_ID"] == "mine"


def test_a_later_run_in_the_same_process_writes_its_own_wandb_dir(tmp_path, monkeypatch, no_user_id):
    """wandb reads the environment at its first init only: without a fresh session, an SFT -> DPO chain in one
    process would put the DPO run's wandb files (and a resumed run's id) where the first run's settings said."""
    import wandb

    for name in ("first", "second"):
        out = tmp_path / name
        out.mkdir()
        monkeypatch.setenv("WANDB_DIR", str(out))  # what configure_reporting sets for each run
        recipe = load_recipe(TINY_RECIPE, [f"train.output_dir={out}", "logging.report_to=[wandb]"])
        with wandb_session(recipe, out, None):
            wandb.init(project="p").finish()  # what transformers' WandbCallback and RunPlots do
        assert len(list((out / "wandb").glob("offline-run-*"))) == 1, name


def _history(path: Path) -> list[dict]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in _wandb_records(path)
        if r.WhichOneof("record_type") == "history"
    ]


@pytest.mark.slow
def test_an_interrupted_and_resumed_run_is_one_wandb_run(tmp_path, no_user_id):
    out = tmp_path / "run"
    extra = ("train.max_steps=2", "data.max_rows=16", "logging.router_stats_steps=0", "logging.report_to=[wandb]")
    with signal_at(1, signal.SIGINT):
        assert train(out, *extra)[0] == 130  # checkpoint-1, then the wandb run is finished
    code, err = train(out, *extra)
    assert code == 0, err[-2000:]
    assert "WANDB_RUN_ID" not in os.environ  # the next run in this process picks its own

    first, resumed = sorted((out / "wandb").glob("offline-run-*"))  # by start time: the same id follows it
    (first_log,), (resumed_log,) = first.glob("run-*.wandb"), resumed.glob("run-*.wandb")
    run_id = first_log.name.removeprefix("run-").removesuffix(".wandb")
    assert resumed_log.name == first_log.name and first.name.endswith(run_id) and resumed.name.endswith(run_id)
    ids = [r.run.run_id for r in _wandb_records(resumed_log) if r.WhichOneof("record_type") == "run"]
    assert ids == [run_id]
    # Each part logs its own steps, on the train/global_step axis: 1 before the stop, 2 after the resume.
    steps = [[h["train/global_step"] for h in _history(log) if "train/loss" in h] for log in (first_log, resumed_log)]
    assert steps == [[1], [2]]
