"""mixtral_ft.data: ChatML parsing, normalization, Mixtral encoding with assistant masks, and the bundled sample.

Local files, folders and hub ids: tests/data/test_files.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from mixtral_ft.data.conversations import encode_conversation, load_sft_data, normalize_messages
from mixtral_ft.data.files import BUILTIN
from mixtral_ft.data.formats import parse_chatml
from mixtral_ft.data.tokenizer import load_tokenizer
from mixtral_ft.recipe import DataSection
from tests.conftest import chatml

EOS = 2


def convo(*contents: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def masked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# --- ChatML ---------------------------------------------------------------------------------------


def test_parse_multi_turn_with_system_folds_system_into_first_user_turn():
    text = chatml(
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
    )
    parsed = parse_chatml(text)
    assert [m["role"] for m in parsed] == ["system", "user", "assistant", "user", "assistant"]
    assert normalize_messages(parsed) == convo("Be brief.\n\nHi", "Hello!", "Name a colour.", "Blue.")


def test_parse_keeps_unicode():
    text = chatml(("user", "你好，今天天气怎么样？"), ("assistant", "今天晴天 ☀️，适合散步 🚶‍♀️。"))
    assert normalize_messages(parse_chatml(text)) == convo("你好，今天天气怎么样？", "今天晴天 ☀️，适合散步 🚶‍♀️。")


def test_surrounding_whitespace_and_blank_lines_are_ignored():
    text = "\n  <|im_start|>user\n  What is 2+2? \n\n<|im_end|>\n\n<|im_start|>assistant\n4\n\n<|im_end|>\n\n  "
    assert normalize_messages(parse_chatml(text)) == convo("What is 2+2?", "4")


def test_trailing_user_turn_is_dropped():
    text = chatml(("user", "Hi"), ("assistant", "Hello!"), ("user", "Are you there?"))
    assert normalize_messages(parse_chatml(text)) == convo("Hi", "Hello!")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("just some plain text", "no ChatML turns"),
        ("", "no ChatML turns"),
        ("Hello <|im_start|>user\nHi<|im_end|>", "before the first"),
        ("<|im_start|>user\nHi", "without <|im_end|>"),
        ("<|im_start|>user\nHi<|im_start|>assistant\nHello<|im_end|>", "without <|im_end|>"),
        ("<|im_start|>user\nHi<|im_end|> stray <|im_start|>assistant\nHello<|im_end|>", "between"),
        ("<|im_start|>\nHi<|im_end|>", "role line"),
        ("<|im_start|>user Hi<|im_end|>", "role line"),
    ],
)
def test_garbage_chatml_raises_value_error(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_chatml(text)


# --- normalize_messages ----------------------------------------------------------------------------


def test_role_aliases_and_sharegpt_keys():
    messages = [
        {"from": "human", "value": " Hi "},
        {"from": "gpt", "value": "Hello"},
        {"role": "Prompter", "content": "Bye"},
        {"role": "bot", "content": "See you"},
    ]
    assert normalize_messages(messages) == convo("Hi", "Hello", "Bye", "See you")


def test_arrow_style_rows_with_none_for_missing_keys():
    messages = [
        {"role": None, "content": None, "from": "human", "value": "Hi"},
        {"role": "assistant", "content": "Hello", "from": None, "value": None},
    ]
    assert normalize_messages(messages) == convo("Hi", "Hello")


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "empty conversation"),
        (convo("Hi", "Hello") + [{"role": "assistant", "content": "Again"}], "two assistant turns in a row"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "two user turns in a row"),
        (convo("Hi", "   "), "empty assistant turn"),
        (convo("", "Hello"), "empty user turn"),
        ([{"role": "wizard", "content": "Hi"}], "unknown role 'wizard'"),
        ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}], "first turn is assistant"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hi"}], "first turn is assistant"),
        (convo("Hi"), "no assistant turn"),
        (convo("Hi", 42), "non-string content"),
        ([{"content": "Hi"}], "without a role"),
        (convo("Hi", "Hello") + [{"role": "system", "content": "late"}], "system turn after the start"),
        (["Hi", "Hello"], "not a {role, content} object"),
        ('[{"role": "user", "content": "Hi"}]', "not a list of turns"),
    ],
)
def test_normalize_rejects(messages, reason):
    with pytest.raises(ValueError, match=reason.replace("{", r"\{").replace("}", r"\}")):
        normalize_messages(messages)


# --- encoding ---------------------------------------------------------------------------------------


def test_simple_encoding_matches_known_ids(tokenizer):
    out = encode_conversation(convo("Hello", "Hi there"), tokenizer)
    assert out["input_ids"][:4] == [1, 733, 16289, 28793]  # <s> [INST]
    assert out["input_ids"][-1] == EOS
    runs = masked_runs(out["input_ids"], out["assistant_masks"])
    # skip_special_tokens=False (the default) decodes v1 ids to raw pieces ("▁Hi▁there</s>")
    assert len(runs) == 1 and tokenizer.decode(runs[0], skip_special_tokens=True) == "Hi there"


def test_multi_turn_ids_and_mask_match_mistral_common(tokenizer, reference):
    contents = [
        "What is the capital of France?",
        "Paris.",
        "Wie heißt die Hauptstadt von Deutschland?",
        "Die Hauptstadt von Deutschland ist Berlin.",
        "And of Japan? 🗾",
        "Tokyo (東京).",
    ]
    out = encode_conversation(convo(*contents), tokenizer)

    request = ChatCompletionRequest(
        messages=[(UserMessage if i % 2 == 0 else AssistantMessage)(content=c) for i, c in enumerate(contents)]
    )
    assert out["input_ids"] == reference.encode_chat_completion(request).tokens
    assert len(out["assistant_masks"]) == len(out["input_ids"])

    sp = reference.instruct_tokenizer.tokenizer
    answers = contents[1::2]
    expected_runs = [sp.encode(a, bos=False, eos=False) + [EOS] for a in answers]
    runs = masked_runs(out["input_ids"], out["assistant_masks"])
    assert runs == expected_runs
    assert [sp.decode(run[:-1]) for run in runs] == answers
    assert sum(out["assistant_masks"]) == sum(len(sp.encode(a, bos=False, eos=False)) + 1 for a in answers)
    # each answer starts right after "[/INST]" (whose last piece is "]")
    starts = [
        i for i, (bit, prev) in enumerate(zip(out["assistant_masks"], [0] + out["assistant_masks"])) if bit and not prev
    ]
    assert [sp.id_to_piece(out["input_ids"][i - 1]) for i in starts] == ["]"] * 3


def test_system_folding_matches_mistral_common_system_prompt(tokenizer, reference):
    messages = [{"role": "system", "content": "Answer in French."}] + convo("Hello", "Bonjour !")
    request = ChatCompletionRequest(
        messages=[
            SystemMessage(content="Answer in French."),
            UserMessage(content="Hello"),
            AssistantMessage(content="Bonjour !"),
        ]
    )
    assert encode_conversation(messages, tokenizer)["input_ids"] == reference.encode_chat_completion(request).tokens


def test_encode_needs_a_finetuning_tokenizer():
    with pytest.raises(TypeError, match="finetuning"):
        encode_conversation(convo("Hi", "Hello"), load_tokenizer(None, mode="test"))


# --- the bundled sample ----------------------------------------------------------------------------


def test_bundled_sample_is_in_oasst_top1_format():
    lines = Path(BUILTIN["oasst_top1"]).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) >= 60 and all(list(r) == ["text"] for r in rows)
    texts = [r["text"] for r in rows]
    assert all(t.startswith("<|im_start|>") and t.endswith("<|im_end|>\n") for t in texts)
    assert sum(t.startswith("<|im_start|>system\n") for t in texts) >= 3
    assert sum(t.count("<|im_start|>assistant\n") >= 2 for t in texts) >= 15
    assert sum(any(ord(ch) > 0x400 or ch in "äöüßñ¿¡éèç" for ch in t) for t in texts) >= 9


def test_load_builtin_sample(tokenizer):
    data = load_sft_data(DataSection(path="builtin:oasst_top1"), tokenizer, max_length=2048, seed=0)
    report = data.reports[0]
    assert report.kept >= 50 and report.kept == report.read and report.dropped == {}
    assert report.line() == (
        f"data: builtin:oasst_top1 [train]: format chatml (auto-detected), read {report.read}, "
        f"kept {report.kept}, dropped 0; {report.supervised_tokens:,} supervised tokens"
    )
    assert data.train.column_names == ["input_ids", "assistant_masks"] and data.eval is None
    for ids, mask in zip(data.train["input_ids"], data.train["assistant_masks"]):
        assert len(ids) == len(mask) and ids[0] == 1 and ids[-1] == EOS and mask[-1] == 1 and mask[0] == 0


def test_test_size_split(tokenizer):
    cfg = DataSection(path="builtin:oasst_top1", test_size=0.1)
    data = load_sft_data(cfg, tokenizer, max_length=2048, seed=3)
    kept = data.reports[0].kept
    assert len(data.eval) == -(-kept // 10) and len(data.train) + len(data.eval) == kept
    # the data line says that not every kept row is trained on
    assert f"kept {kept} ({len(data.eval)} held out for eval), dropped 0" in data.reports[0].line()
    again = load_sft_data(cfg, tokenizer, max_length=2048, seed=3)
    assert again.eval["input_ids"] == data.eval["input_ids"]


def test_max_rows(tokenizer):
    data = load_sft_data(DataSection(path="builtin:oasst_top1", max_rows=5), tokenizer, max_length=2048, seed=0)
    assert data.reports[0].read == 5 and len(data.train) == 5
