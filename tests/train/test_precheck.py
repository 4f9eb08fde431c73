"""train's checks before the model loads: here, that train.compile (and bench's --compile) needs a torch with
F.grouped_mm. pyproject allows torch 2.6 as transformers 5 does; torch 2.6 has neither F.grouped_mm nor dynamo's
recompile_limit, and compiled training crashed with an AttributeError after the model had loaded."""

import pytest
import torch

from mixtral_ft.bench import args as bench_args
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe
from mixtral_ft.train.precheck import precheck
from tests.conftest import TINY_RECIPE


def test_compile_on_a_torch_without_grouped_mm_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", torch.matmul, raising=False)  # as torch >= 2.10 has it
    precheck(load_recipe(TINY_RECIPE, ["train.compile=true"]))
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")  # as torch < 2.10 lacks it
    precheck(load_recipe(TINY_RECIPE))  # without compile: nothing to refuse
    with pytest.raises(
        UserError, match=r"^train.compile needs torch >= 2.10 \(this is torch .+\): upgrade torch, or set"
    ):
        precheck(load_recipe(TINY_RECIPE, ["train.compile=true"]))
    with pytest.raises(UserError, match=r"^--compile needs torch >= 2.10 .*: upgrade torch, or drop --compile$"):
        bench_args.parse_args(["--tiny", "--device", "cpu", "--compile"])


def test_hub_push_without_a_token_stops_before_training(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from mixtral_ft.cli import main

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    out = tmp_path / "run"
    push = ["hub.push=true", "hub.repo_id=org/tiny"]
    assert main(["train", TINY_RECIPE, f"train.output_dir={out}", *push]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hub.push is true but there is no Hugging Face token" in err[0], err
    assert f"mixtral-ft push {out} --repo-id" in err[0] and not out.exists()
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    precheck(load_recipe(TINY_RECIPE, [f"train.output_dir={out}", *push]))  # a token: no error


def test_lora_settings_an_adapter_would_ignore_are_refused(tmp_path_factory, capsys):
    from mixtral_ft.cli import main
    from tests.conftest import trained_adapter

    adapter = trained_adapter(tmp_path_factory)  # r 16, alpha 32, q/k/v/o: the defaults
    capsys.readouterr()  # its training's output, when this test trained it
    out = tmp_path_factory.mktemp("continued") / "run"
    given = [f"model.adapter={adapter}", f"train.output_dir={out}"]
    for override, message in [
        ("lora.r=8", "lora.r (8) is not used with model.adapter"),
        ("lora.target_modules=[q_proj]", "lora.target_modules (['q_proj']) is not used"),
        ("lora.use_rslora=true", "lora.use_rslora (True) is not used"),
    ]:
        assert main(["train", TINY_RECIPE, *given, override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "drop model.adapter to train a new adapter" in err[0], err
        assert not out.exists()
    # The adapter's own values (here also the defaults, as a resolved recipe.yaml lists them) pass, in any order.
    precheck(load_recipe(TINY_RECIPE, [*given, "lora.target_modules=[v_proj,q_proj,o_proj,k_proj]", "lora.r=16"]))
