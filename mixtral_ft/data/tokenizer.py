"""Mixtral's real tokenizer, from the `mistral-common` package: no download, production chat format.

Mixtral-8x7B uses the 32k sentencepiece model that mistral-common ships as `tokenizer.model.v1`.
transformers' `MistralCommonBackend` renders the Mixtral-Instruct format from it
(`<s>[INST] user [/INST] answer</s>`), the same ids as mistral-common's reference encoder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mixtral_ft.common import cache_root

TOKENIZER_FILE = "tokenizer.model.v1"


def bundled_tokenizer_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILE


def _mistral_tokenizer_files(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return [f for f in os.listdir(directory) if f.startswith("tokenizer.model.v") or f == "tekken.json"]


def load_tokenizer(model_dir: str | os.PathLike | None = None, *, mode: str = "finetuning"):
    """The MistralCommonBackend for a model folder, or mistral-common's bundled Mixtral tokenizer.

    `mode="finetuning"` encodes conversations that end on an assistant turn (with its `</s>`);
    `mode="test"` encodes prompts that end on a user turn, for generation.
    """
    from transformers.tokenization_mistral_common import MistralCommonBackend

    directory = Path(model_dir) if model_dir else None
    if directory is None or not _mistral_tokenizer_files(directory):
        # Hub Mixtral folders carry a HF tokenizer.json without a chat template; the bundled v1 file is
        # the same 32k vocabulary with the Instruct format, so every model gets one chat format.
        directory = Path(_bundled_dir())
    return MistralCommonBackend.from_pretrained(str(directory), mode=mode)


def _bundled_dir() -> str:
    cache = cache_root() / "tokenizer"
    if not (cache / TOKENIZER_FILE).exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundled_tokenizer_file(), cache / TOKENIZER_FILE)
    return str(cache)


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Save so that plain `AutoTokenizer.from_pretrained(out_dir)` gives the same tokenizer back."""
    tokenizer.save_pretrained(str(out_dir))
    # AutoTokenizer picks MistralCommonBackend for sentencepiece-v1 files only when told to.
    config = {"tokenizer_class": "MistralCommonBackend", "model_max_length": 32768}
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
