"""Fixtures of the data tests: our tokenizer, and mistral-common's own as the reference our ids must equal."""

import pytest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_ft.data.tokenizer import bundled_tokenizer_file, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, mode="finetuning")


@pytest.fixture(scope="module")
def reference():
    # mistral-common on its own, independent of transformers' backend and of mixtral_ft.
    return MistralTokenizer.from_file(str(bundled_tokenizer_file()), mode=ValidationMode.finetuning)
