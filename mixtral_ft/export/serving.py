"""Serving-ready exports: the files vLLM and TGI load from a merged model or an adapter folder.

A merged folder already holds safetensors shards, config.json and Mistral's `tokenizer.model.v1` with a
tokenizer_config.json naming MistralCommonBackend (what `AutoTokenizer` in this stack reads, and what vLLM's
`--tokenizer-mode mistral` uses). TGI's router needs a Hugging Face `tokenizer.json` and a chat template,
so `write_hf_tokenizer` adds both, built from the same sentencepiece file, with a Jinja template that gives
the same ids as mistral-common's v1 encoder (tests/export/test_serving.py checks that). An adapter is served on its
base model (vLLM `--enable-lora`, TGI `--lora-adapters`): it needs adapter_model.safetensors and an
adapter_config.json whose `base_model_name_or_path` names the base as users know it (the hub id).

`serving_problems(folder)` checks a folder against these rules; no serving engine runs here (vLLM and TGI
are GPU servers), so the rules stand in for them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# Mixtral-Instruct's format as mistral-common's v1 tokenizer renders it:
# <s> [INST] user [/INST] answer</s> [INST] user [/INST]; a system prompt has no role of its own.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] | trim + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- ' [INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
MERGED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model.v1")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def write_hf_tokenizer(folder: str | Path) -> None:
    """Add tokenizer.json, chat_template.jinja and tokenizer_config.json's chat_template to `folder`.

    tokenizer_config.json keeps naming MistralCommonBackend (see tokenizer.save_tokenizer); the HF files
    are built from the folder's `tokenizer.model.v1`, or mistral-common's bundled one.
    """
    from transformers import LlamaTokenizer

    from mixtral_ft.data.tokenizer import TOKENIZER_FILE, bundled_tokenizer_file

    folder = Path(folder)
    source = folder / TOKENIZER_FILE if (folder / TOKENIZER_FILE).is_file() else bundled_tokenizer_file()
    with tempfile.TemporaryDirectory() as work:
        shutil.copy(source, Path(work) / "tokenizer.model")
        hf = LlamaTokenizer.from_pretrained(work, legacy=False)
        hf.chat_template = CHAT_TEMPLATE
        hf.save_pretrained(Path(work) / "out")
        shutil.copy(Path(work) / "out" / "tokenizer.json", folder / "tokenizer.json")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config.update({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    config.setdefault("model_max_length", 32768)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def serving_kind(folder: Path) -> str:
    return "adapter" if (folder / "adapter_config.json").is_file() else "merged"


def serving_problems(folder: str | Path) -> list[str]:
    """What keeps vLLM or TGI from loading `folder` (a merged model or an adapter); [] when nothing does."""
    folder = Path(folder)
    if serving_kind(folder) == "adapter":
        return _adapter_problems(folder)
    return [*_weight_problems(folder), *_config_problems(folder)]


def _adapter_problems(folder: Path) -> list[str]:
    problems = [f"missing {name}" for name in ADAPTER_FILES if not (folder / name).is_file()]
    if (folder / "adapter_model.bin").exists():
        problems.append("adapter_model.bin: serving engines want safetensors only")
    config = json.loads((folder / "adapter_config.json").read_text())  # serving_kind found it
    if not config.get("base_model_name_or_path"):
        problems.append("adapter_config.json has no base_model_name_or_path")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')}: vLLM and TGI serve LoRA adapters only")
    if config.get("use_dora") or config.get("modules_to_save"):
        problems.append("DoRA / modules_to_save adapters are not servable as LoRA")
    return problems


def _weight_problems(folder: Path) -> list[str]:
    problems = [f"missing {name}" for name in MERGED_FILES if not (folder / name).is_file()]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        problems.append("no *.safetensors weights")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        problems.append("pickle weights (*.bin / *.pt): serving engines want safetensors only")
    if len(shards) > 1:
        index = folder / "model.safetensors.index.json"
        if not index.is_file():
            problems.append("several shards but no model.safetensors.index.json")
        else:
            named = set(json.loads(index.read_text())["weight_map"].values())
            problems += [f"index names missing shard {n}" for n in sorted(named) if not (folder / n).is_file()]
    return problems


def _config_problems(folder: Path) -> list[str]:
    problems = []
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "mixtral" or "MixtralForCausalLM" not in config.get("architectures", []):
            problems.append("config.json is not a MixtralForCausalLM config")
        if "quantization_config" in config:
            problems.append("config.json has a quantization_config: serve the merged bf16/fp16 weights")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file() and not json.loads(tokenizer_config.read_text()).get("chat_template"):
        problems.append("tokenizer_config.json has no chat_template (TGI's chat endpoint needs one)")
    return problems
