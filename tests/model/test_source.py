"""Model names that are not models: one line naming the fix, before any load or Hub request."""

import pytest

from mixtral_ft.cli import main
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "name, message",
    [
        ("./no_such_folder", "neither a local folder nor a hub id"),
        ("../no/such_folder", "neither a local folder nor a hub id"),
        ("org/modèle", "neither a local folder nor a hub id"),  # the Hub's names are ASCII: no download tried
        ("{adapter}", "is a LoRA adapter folder, not a model"),
    ],
)
def test_a_name_that_is_not_a_model_is_one_line_and_exit_2(name, message, tmp_path, monkeypatch, capsys):
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert main(["audit", name.format(adapter=adapter)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.mark.parametrize("command", ["chat", "merge"])
def test_an_adapter_config_that_is_not_json_is_one_line_and_exit_2(command, tmp_path, capsys):
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": ')  # truncated
    argv = {"chat": ["--prompt", "hi"], "merge": ["--out", str(tmp_path / "out")]}[command]
    assert main([command, str(adapter), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter_config.json is not valid JSON" in err[0], err


@pytest.mark.parametrize(
    "config, message",
    [
        ("{bad", "config.json is not valid JSON"),
        ("[1, 2]", "config.json has no model_type"),
        ("{}", "config.json has no model_type"),
    ],
)
@pytest.mark.parametrize("command", [["audit", "{model}"], ["quantize", "{model}", "{out}"], ["plan", "{recipe}"]])
def test_a_broken_config_json_is_one_line_and_exit_2(command, config, message, tmp_path, capsys):
    """A truncated or hand-written config.json was a transformers traceback (plan's: a TypeError)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(config)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes" / "tiny.yaml").read_text().replace("name: tiny", f"name: {model}"))
    argv = [a.format(model=model, out=tmp_path / "out", recipe=recipe) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1] and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "out").exists()


def hub_answer(error, status: int, **extra):
    """The exception huggingface_hub raises for a Hub answer of `status` (a real httpx response, no server)."""
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/m"))
    return error("the Hub's message", response=response, **extra)


def test_each_hub_answer_gets_its_own_fix(monkeypatch):
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from mixtral_ft.model.source import fetch_problem

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    gated = fetch_problem(hub_answer(GatedRepoError, 403), "org/m", None)
    assert "is gated" in gated and "https://huggingface.co/org/m" in gated and "hf auth login" in gated
    assert "no revision 'v9'; fix model.revision" in fetch_problem(hub_answer(RevisionNotFoundError, 404), "o/m", "v9")
    missing = fetch_problem(hub_answer(RepositoryNotFoundError, 404), "org/m", None)
    assert "no such repo, or a private one" in missing and "model.name" in missing
    unreachable = fetch_problem(LocalEntryNotFoundError("cannot reach"), "org/m", None)
    assert "the Hub did not answer and it is not in the local cache" in unreachable
    assert "(ValueError)" in fetch_problem(ValueError("odd"), "org/m", None)  # anything else: named, generic fix
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in fetch_problem(LocalEntryNotFoundError("offline"), "org/m", None)


def test_an_uncached_hub_model_offline_is_one_line_naming_hf_hub_offline(tmp_path, capsys):
    # conftest sets HF_HUB_OFFLINE; the id is not in the (private) cache, so snapshot_download itself refuses.
    out = tmp_path / "run"
    recipe = str(ROOT / "recipes/tiny.yaml")
    assert main(["train", recipe, "model.name=someorg/not-cached", f"train.output_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [
        "error: could not fetch model 'someorg/not-cached' from the Hub: HF_HUB_OFFLINE is set and it is not in "
        "the local cache; unset it to download the model"
    ]
    assert not out.exists()


def test_tokenizer_folder_builds_and_fetches_nothing(tiny_dir):
    """`mixtral-ft data`'s tokenizer: the folder train would read, or None (the bundled one) for a Hub id not cached."""
    from mixtral_ft.model.source import model_source

    assert model_source("tiny").tokenizer_folder() == tiny_dir
    assert model_source(str(tiny_dir)).tokenizer_folder() == tiny_dir
    assert model_source("nobody-xyz/not-a-cached-model").tokenizer_folder() is None  # HF_HUB_OFFLINE: no request
