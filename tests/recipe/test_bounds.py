"""Issue 16, cases 7-11: recipes that validated but crashed or hung later, and secrets in recipe values or pushes.

All through `mixtral-ft validate` (or push --dry-run), in-process: exit 2 and one line naming the key and the fix.
"""

from pathlib import Path

import pytest

from mixtral_ft.cli import main
from mixtral_ft.data.sources import mixture_counts
from mixtral_ft.errors import UserError
from mixtral_ft.export.hub import push_folder

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
TOKEN = "hf_SENTINELq8ZtWq3nL0vR7xKc2abcdefghij"


def validate(capsys, recipe: str, *overrides: str) -> str:
    capsys.readouterr()
    args = [a for o in overrides for a in ("--set", o)]
    code = main(["validate", recipe, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def bomb(levels: int) -> str:
    lines = ["x0: &x0 {a: 1, b: 2}"] + [f"x{n}: &x{n} {{a: *x{n - 1}, b: *x{n - 1}}}" for n in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            bomb(29),
            "expands to more than 100,000 values",
        ),  # 2**29 leaves: the secret scan used to walk them all
        (
            "model: " + "[" * 100_000 + "]" * 100_000 + "\n",
            "nests deeper than 64 levels",
        ),  # was a RecursionError
        (
            Path(TINY).read_text() + "lora:\n  r: 8\n",
            "repeats the key 'lora' (line",
        ),  # the last one used to win
    ],
)
def test_yaml_bombs_deep_nesting_and_duplicate_keys_are_refused(tmp_path, capsys, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert message in validate(capsys, str(recipe))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.seed=4294967296", "'train.seed' must be >= 0 and below 2**32"),
        ("train.num_train_epochs=.inf", "'train.num_train_epochs' must be a finite number"),
        ("train.learning_rate=.inf", "'train.learning_rate' must be a finite number"),
        ("train.learning_rate=.nan", "'train.learning_rate' must be a finite number"),
        (
            "data.mixture=[{path: builtin:oasst_top1, weight: .inf}]",
            "'data.mixture[0].weight' must be a finite number",
        ),
        ("hub.repo_id=a/b..c", "'hub.repo_id' must be ORG/NAME"),
        ("hub.repo_id=a/b.git", "'hub.repo_id' must be ORG/NAME"),
        (f"logging.run_name={TOKEN}", "'logging.run_name' holds what looks like a Hugging Face token"),
        (
            "logging.run_name=sk-proj-abcdefghijklmnopqrstuvwxyz0123",
            "'logging.run_name' holds what looks like an API key",
        ),
        ("logging.project=0123456789abcdef0123456789abcdef01234567", "looks like a wandb API key"),
        # Integers past 64 bits reached torch / numpy / islice as tracebacks; a rank past Mixtral's width as one too.
        ("lora.r=99999999999999999999999", "'lora.r' must be an integer below 2**63"),
        ("train.per_device_train_batch_size=99999999999999999999999", "below 2**63"),
        ("train.max_steps=-99999999999999999999999", "'train.max_steps' must be an integer below 2**63"),
        ("lora.r=1099511627776", "'lora.r' must be > 0 and at most 4096"),
    ],
)
def test_values_that_used_to_validate_and_crash_later(capsys, override, message):
    assert message in validate(
        capsys, TINY, "data.path=null" if "mixture" in override else "data.split=train", override
    )


def test_a_mixture_size_past_what_memory_can_index_is_refused(capsys):
    # Its row index, 8 bytes a row, was built in memory: 74 GiB, then numpy's MemoryError traceback.
    mixture = ("data.path=null", "data.mixture=[{path: builtin:oasst_top1}]")
    assert "'data.mixture_size' must be at most 10**8" in validate(
        capsys, TINY, *mixture, "data.mixture_size=10000000000"
    )
    assert main(["validate", TINY, *(f"--set={o}" for o in (*mixture, "data.mixture_size=100000000"))]) == 0


def test_a_commit_hash_revision_is_not_a_secret(capsys):
    assert main(["validate", TINY, "--set", "model.revision=0123456789abcdef0123456789abcdef01234567"]) == 0


def test_huge_mixture_weights_do_not_overflow_the_shares():
    # 1e308 + 1e308 is inf: every share used to become 0 (2 rows trained, "1 of 132 rows" reported).
    assert mixture_counts([1e308, 1e308], 132) == [66, 66]
    assert mixture_counts([1e308, 3e307], 13) == [10, 3]


@pytest.mark.parametrize("name", ["train.log", "run-1.wandb", "events.out.tfevents.1.host", "notes.bin"])
def test_push_scans_every_file_it_would_upload(tmp_path, monkeypatch, name):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "logs").mkdir()
    (folder / "logs" / name).write_bytes(b"\x00\x01binary" + b"x" * 100 + b"HF_TOKEN=" + TOKEN.encode() + b"\xff")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(UserError, match="contains the value of HF_TOKEN"):
        push_folder(folder, "my-org/run", dry_run=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(
        UserError, match="contains the value of HF_TOKEN"
    ):  # an hf_ token that is not ours is refused too
        push_folder(folder, "my-org/run", dry_run=True)


# The Hub's rule for ORG/NAME (huggingface_hub.utils.validate_repo_id, and ASCII): one definition, recipe.is_repo_id,
# used by hub.repo_id, push, model.name (Hub id or missing folder), the adapter's recorded base and the card's metadata.
REPO_IDS_TAKEN = ["mistralai/Mixtral-8x7B-v0.1", "my-org/mixtral.sft_2", "a/b", "A1/b-c.d_e", "org/" + "n" * 96]
REPO_IDS_REFUSED = [
    *(None, "", "mixtral", "a/b/c", "/b", "a/", "org/x y", "org\\x"),
    *("-org/x", ".org/x", "_org/x", "org/-x", "org/.x", "org/x-", "org/x.", "org-/x"),
    *("org/x--y", "org/x..y", "org/x.git", "org/" + "n" * 97, "orgé/x", "org/modèle", "org/xｘ"),
    *("./x", "../x/y", "~/x", 3),
]


@pytest.mark.parametrize("repo_id", REPO_IDS_TAKEN)
def test_repo_ids_the_hub_takes_are_taken(repo_id):
    from mixtral_ft.recipe import is_repo_id

    assert is_repo_id(repo_id)


@pytest.mark.parametrize("repo_id", REPO_IDS_REFUSED)
def test_repo_ids_the_hub_refuses_are_refused(repo_id):
    from mixtral_ft.recipe import is_repo_id

    assert not is_repo_id(repo_id)
