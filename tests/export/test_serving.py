"""Issue 11: model.attn_implementation, and exports in the layouts vLLM and TGI load (checked by rules).

No serving engine runs here: vLLM and TGI are GPU servers. The rules in `serving.serving_problems` stand in
for them, and the HF tokenizer is checked the way TGI's router uses it (tokenizers' tokenizer.json plus
the Jinja chat template from tokenizer_config.json) against mistral-common's own ids.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from mixtral_ft.cli import main
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe
from tests.conftest import trained_adapter

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! I'm here."},
        {"role": "user", "content": "How are you?\nTwo lines."},
    ],
]


# --- model.attn_implementation ---------------------------------------------------------------------


def test_attn_implementation_defaults_to_sdpa_and_is_checked():
    assert load_recipe(TINY).model.attn_implementation == "sdpa"
    assert load_recipe(TINY, ["model.attn_implementation=eager"]).model.attn_implementation == "eager"
    with pytest.raises(UserError) as info:
        load_recipe(TINY, ["model.attn_implementation=flash"])
    assert "model.attn_implementation" in str(info.value) and "sdpa" in str(info.value)


def test_flash_attention_on_cpu_or_without_the_package_is_refused():
    from mixtral_ft.model.device import check_attn_implementation

    with pytest.raises(UserError, match="CUDA GPU"):
        check_attn_implementation("flash_attention_2", "cpu")
    assert check_attn_implementation(None, "cpu") == "sdpa"


@pytest.mark.parametrize("installed", [False, True])
def test_flash_attention_on_cuda_needs_the_flash_attn_package(monkeypatch, installed):
    # No GPU or flash-attn here: the package check runs for a CUDA device whatever the machine has, so a
    # stand-in find_spec decides whether flash_attn is importable; everything else is looked up for real.
    import importlib.util
    from importlib.machinery import ModuleSpec

    from mixtral_ft.model.device import check_attn_implementation

    real_find_spec = importlib.util.find_spec
    asked = []

    def find_spec(name, *args, **kwargs):
        if name == "flash_attn":
            asked.append(name)
            return ModuleSpec(name, None) if installed else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if installed:
        assert check_attn_implementation("flash_attention_2", "cuda") == "flash_attention_2"
    else:
        with pytest.raises(UserError) as info:
            check_attn_implementation("flash_attention_2", "cuda")
        message = str(info.value)
        assert "flash-attn package" in message and "pip install flash-attn" in message and "sdpa" in message
        assert "\n" not in message
    assert asked == ["flash_attn"]


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "tiny", "--prompt", "hi", "--attn-implementation", "flash_attention_2"],
        ["train", TINY, "model.attn_implementation=flash_attention_2", "train.output_dir=/nonexistent/never"],
    ],
)
def test_flash_attention_exits_2_with_one_line(argv, capsys, tmp_path):
    if argv[0] == "train":
        argv = [*argv[:-1], f"train.output_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "flash_attention_2" in errors[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_load_model_uses_the_kernel_and_keeps_sliding_window(tiny_dir, attn):
    import torch
    from transformers import AutoConfig

    from mixtral_ft.model.load import load_model

    model = load_model("tiny", attn_implementation=attn)
    assert model.config._attn_implementation == attn
    assert model.config.sliding_window == AutoConfig.from_pretrained(tiny_dir).sliding_window
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 733, 16289, 28793]])).logits).all()


# --- serving layouts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    return trained_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def merged(adapter_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "merged"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["merge", str(adapter_run), "--out", str(out)]) == 0
    return out


def test_merged_and_adapter_folders_pass_the_serving_rules(merged, adapter_run):
    from mixtral_ft.export.serving import serving_problems

    assert serving_problems(merged) == []
    assert serving_problems(adapter_run) == []
    assert {"tokenizer.json", "chat_template.jinja", "tokenizer.model.v1"} <= {p.name for p in merged.iterdir()}


def test_serving_rules_catch_what_engines_refuse(merged, adapter_run, tmp_path):
    from mixtral_ft.export.serving import serving_problems

    broken = tmp_path / "merged"
    shutil.copytree(merged, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"x")
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    problems = " | ".join(serving_problems(broken))
    assert "missing tokenizer.json" in problems and "safetensors only" in problems and "chat_template" in problems

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_run, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert serving_problems(adapter) == ["adapter_config.json has no base_model_name_or_path"]


def test_tgi_style_tokenizer_gives_mistral_commons_ids(merged):
    """tokenizer.json + tokenizer_config.json's chat_template (TGI's router) == MistralCommonBackend's ids."""
    import jinja2
    from tokenizers import Tokenizer

    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.use.chat import build_messages, encode_prompt

    reference = load_tokenizer(merged, mode="test")
    fast = Tokenizer.from_file(str(merged / "tokenizer.json"))
    template = jinja2.Environment().from_string(
        json.loads((merged / "tokenizer_config.json").read_text())["chat_template"]
    )
    for messages in CONVERSATIONS:
        for system in (None, "Answer briefly."):
            turns = messages if system is None else [{"role": "system", "content": system}, *messages]
            text = template.render(messages=turns, bos_token="<s>", eos_token="</s>")
            ids = fast.encode(text, add_special_tokens=False).ids
            assert ids == encode_prompt(reference, build_messages(messages, system)), (messages, system)


def test_merged_tokenizer_still_loads_as_mistral_common(merged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert type(tokenizer).__name__ == "MistralCommonBackend"


def test_adapter_config_names_a_hub_base_not_a_cache_folder(adapter_run, tmp_path):
    from mixtral_ft.model.load import set_adapter_base

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_run, adapter)
    before = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    set_adapter_base(adapter, "tiny")  # not a hub id: peft's path stays
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == before
    set_adapter_base(adapter, "mistralai/Mixtral-8x7B-Instruct-v0.1")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
