"""Push: the adapter and merged folders reach the Hub (a local stand-in) with our card, and no secret leaks."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_ft.cli import main
from tests.export.conftest import HF_SENTINEL, assert_no_secret, commits, hub_env

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


@pytest.mark.slow
def test_training_with_hub_push_uploads_the_adapter(trained):
    adapter, proc, calls = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(c["path"].startswith("/api/") for c in calls)
    create = [c for c in calls if c["path"] == "/api/repos/create"]
    assert len(create) == 1
    assert create[0]["body"]["organization"] == "org" and create[0]["body"]["name"] == "tiny-sft"
    assert create[0]["body"]["visibility"] == "private"  # hub.private defaults to true
    assert create[0]["auth"] == f"Bearer {HF_SENTINEL}"
    [files] = commits(calls, "org/tiny-sft")
    assert {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "run.json",
        "tokenizer_config.json",
    } <= set(files)
    assert not [f for f in files if f.startswith("checkpoint-") or f == "training_args.bin"]
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "- mixtral\n- qlora\n- mixtral-ft" in card and "OpenAssistant/oasst_top1_2023-08-25" in card
    assert_no_secret(adapter)


@pytest.mark.slow
def test_push_merged_model_through_the_cli(hub, merged):
    dirs, _ = merged
    before = len(hub.calls)
    cmd = [sys.executable, "-m", "mixtral_ft.cli", "push", str(dirs["orig"]), "--repo-id", "org/merged", "--no-private"]
    proc = subprocess.run(cmd, env=hub_env(hub), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = hub.calls[before:]
    create = [c["body"] for c in calls if c["path"] == "/api/repos/create"]
    assert create == [{"name": "merged", "organization": "org", "visibility": "public", "type": "model"}]
    [files] = commits(calls, "org/merged")
    assert {"README.md", "config.json", "model.safetensors", "merge.json", "tokenizer.model.v1"} <= set(files)
    assert "library_name: transformers" in files["README.md"].decode()
    assert_no_secret(dirs["orig"])


def test_dry_run_lists_files_and_needs_no_token(adapter, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = {p: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    assert main(["push", str(adapter), "--repo-id", "org/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing uploaded" in out and "(private)" in out
    assert re.search(r"adapter_model\.safetensors\s+\d+\.\d KiB", out)
    assert "README.md" in out and "checkpoint-" not in out and "training_args.bin" not in out
    assert {p: p.read_bytes() for p in adapter.iterdir() if p.is_file()} == before  # nothing written


def test_secrets_are_scrubbed_from_the_card_and_block_the_push(adapter, tmp_path, monkeypatch, capsys):
    from mixtral_ft.train.card import render_card

    monkeypatch.setenv("HF_TOKEN", HF_SENTINEL)
    folder = tmp_path / "leaky"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((adapter / name).read_bytes())
    recipe = (adapter / "recipe.yaml").read_text().replace("max_rows: null", f"max_rows: null  # {HF_SENTINEL}")
    (folder / "recipe.yaml").write_text(recipe.replace("builtin:oasst_top1", f"https://x.test/?t={HF_SENTINEL}"))
    card = render_card(folder, "adapter", "org/x")
    assert HF_SENTINEL not in card and "?t=***" in card
    assert main(["push", str(folder), "--repo-id", "org/x", "--dry-run"]) == 2
    assert "contains the value of HF_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case",
    [
        "bad_repo",
        "no_namespace",
        "not_a_folder_kind",
        "missing_dir",
        "no_token",
        "merge_out_exists",
        "merge_missing_adapter",
        "merge_model_not_adapter",
        "recipe_push_without_repo",
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, adapter, tiny_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    argv, expect = {
        "bad_repo": (["push", str(adapter), "--repo-id", "not a repo!"], "bad repo id"),
        "no_namespace": (["push", str(adapter), "--repo-id", "just-a-name"], "bad repo id"),
        "not_a_folder_kind": (["push", str(junk), "--repo-id", "org/x"], "not an adapter or model folder"),
        "missing_dir": (["push", str(tmp_path / "nope"), "--repo-id", "org/x"], "does not exist"),
        "no_token": (["push", str(adapter), "--repo-id", "org/x"], "hf auth login"),
        "merge_out_exists": (["merge", str(adapter), "--out", str(junk)], "already exists"),
        "merge_missing_adapter": (["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not found"),
        "merge_model_not_adapter": (["merge", str(tiny_dir), "--out", str(tmp_path / "o")], "adapter_config.json"),
        "recipe_push_without_repo": (["validate", str(TINY), "--set", "hub.push=true"], "hub.repo_id"),
    }[case]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = (adapter / "README.md").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and expect in err, err
    assert "Traceback" not in err
    assert (adapter / "README.md").read_bytes() == before  # a refused push writes nothing
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_push_leaves_the_folders_own_readme_as_it_is(hub, adapter, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "run.json"):
        (folder / name).write_bytes((adapter / name).read_bytes())
    (folder / "README.md").write_text("my own notes on this run\n")
    before = len(hub.calls)
    cmd = [sys.executable, "-m", "mixtral_ft.cli", "push", str(folder), "--repo-id", "org/mine"]
    proc = subprocess.run(cmd, env=hub_env(hub), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    create = [c["body"] for c in hub.calls[before:] if c["path"] == "/api/repos/create"]
    assert [c["visibility"] for c in create] == ["private"]  # push's default; --no-private: see the merged push
    [files] = commits(hub.calls[before:], "org/mine")
    assert files["README.md"].decode().startswith("---\n") and "# org/mine" in files["README.md"].decode()
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "run.json"}
    assert (folder / "README.md").read_text() == "my own notes on this run\n"  # the card went up from memory


def test_a_checkpoint_folder_pushes_its_adapter_not_the_trainer_pickles(adapter, capsys):
    [checkpoint] = adapter.glob("checkpoint-*")
    assert (checkpoint / "optimizer.pt").is_file()
    assert main(["push", str(checkpoint), "--repo-id", "org/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out
    assert not re.search(r"optimizer\.pt|scheduler\.pt|rng_state|training_args\.bin", out), out


def test_dry_run_says_the_visibility_asked_for_and_help_says_an_existing_repo_keeps_its_own(adapter, capsys):
    assert main(["push", str(adapter), "--repo-id", "org/x", "--dry-run", "--no-private"]) == 0
    assert "to org/x (public); nothing uploaded" in capsys.readouterr().out
    # As hf upload's --private: the Hub API sets visibility when it creates the repo, not after.
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    assert "an existing one keeps its own" in " ".join(capsys.readouterr().out.split())


# tests/test_error_fixes.py holds every `hf ...` an error names to these.
HF_COMMANDS = (("auth", "login"), ("upload",))


@pytest.mark.parametrize("words", HF_COMMANDS)
def test_the_hub_commands_we_name_exist(words):
    """Errors, README and notebooks say `hf auth login` (and compare with `hf upload --private`): huggingface_hub 1.x
    dropped `huggingface-cli`, so the lock's huggingface_hub must still have these commands."""
    cmd = [sys.executable, "-m", "huggingface_hub.cli.hf", *words, "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert words != ("upload",) or "--no-private" in proc.stdout
