"""mixtral_ft.data.prefs: preference pairs in Mixtral's format from every layout, and bad rows counted and dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_ft.data.prefs import fit_pair, load_preference_data
from mixtral_ft.data.tokenizer import bundled_tokenizer_file, load_tokenizer
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection

EOS = 2
QUESTION, GOOD, BAD = "What is the capital of France?", "The capital of France is Paris.", "It is London."
PAIR = {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path, tokenizer, *, max_length=256, max_prompt_length=128, **data):
    return load_preference_data(
        DataSection(path=str(path), **data),
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        seed=0,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, mode="finetuning")


# --- pairs in Mixtral's format -------------------------------------------------------------------------


def test_pair_is_mistral_commons_encoding(tokenizer, tmp_path):
    reference = MistralTokenizer.from_file(str(bundled_tokenizer_file()), mode=ValidationMode.finetuning)
    row = load(write_jsonl(tmp_path / "p.jsonl", [PAIR]), tokenizer).train[0]
    for answer, ids in ((GOOD, row["chosen_ids"]), (BAD, row["rejected_ids"])):
        request = ChatCompletionRequest(messages=[UserMessage(content=QUESTION), AssistantMessage(content=answer)])
        assert row["prompt_ids"] + ids == reference.encode_chat_completion(request).tokens
        assert ids[-1] == EOS and EOS not in row["prompt_ids"]
    assert tokenizer.decode(row["prompt_ids"], skip_special_tokens=True) == f"[INST] {QUESTION} [/INST]"
    assert row["prompt_ids"][0] == 1  # <s>
    assert tokenizer.decode(row["chosen_ids"], skip_special_tokens=True).strip() == GOOD


def test_string_trl_and_ultrafeedback_layouts_agree(tokenizer, tmp_path):
    user, good, bad = (
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": GOOD},
        {"role": "assistant", "content": BAD},
    )
    layouts = [
        PAIR,
        {"prompt": [user], "chosen": [good], "rejected": [bad]},  # TRL conversational
        {"prompt": QUESTION, "chosen": [user, good], "rejected": [user, bad]},  # ultrafeedback_binarized
        {"chosen": [user, good], "rejected": [user, bad]},
    ]  # the same without the prompt column
    encoded = [load(write_jsonl(tmp_path / f"{i}.jsonl", [row]), tokenizer).train[0] for i, row in enumerate(layouts)]
    assert all(e == encoded[0] for e in encoded)


def test_multi_turn_prompt_keeps_earlier_turns(tokenizer, tmp_path):
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": QUESTION},
    ]
    row = load(write_jsonl(tmp_path / "m.jsonl", [{"prompt": turns, "chosen": GOOD, "rejected": BAD}]), tokenizer)
    prompt = row.train[0]["prompt_ids"]
    assert tokenizer.decode(prompt, skip_special_tokens=True) == f"[INST] Hi [/INST] Hello! [INST] {QUESTION} [/INST]"
    assert prompt.count(EOS) == 1  # the earlier answer's </s>


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def shown(ids: list[int], tokenizer) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_a_long_prompt_loses_its_oldest_exchanges_first(tokenizer):
    old = [user("Tell me about cats. " * 30), assistant("Cats are small carnivores. " * 30)]
    recent = [user("And dogs?"), assistant("Dogs are loyal.")]
    prompt, chosen, rejected, shortened = fit_pair([*old, *recent, user(QUESTION)], GOOD, BAD, tokenizer, 96, 48)
    # TRL's cut keeps the last 47 tokens: a prompt that starts inside the old answer about cats.
    assert shown(prompt, tokenizer) == f"[INST] And dogs? [/INST] Dogs are loyal. [INST] {QUESTION} [/INST]"
    assert shortened and prompt[0] == 1 and chosen[-1] == rejected[-1] == EOS  # whole answers: they had room
    system = {"role": "system", "content": "Answer in one sentence."}
    prompt, *_ = fit_pair([system, *old, user(QUESTION)], GOOD, BAD, tokenizer, 96, 48)
    assert shown(prompt, tokenizer) == f"[INST] Answer in one sentence.\n\n{QUESTION} [/INST]"  # the system stays


def test_a_long_question_loses_its_start_and_keeps_inst(tokenizer):
    question = "Summarize this: " + "word " * 200 + "The end."
    prompt, chosen, _, shortened = fit_pair([user(question)], GOOD + " " + "More. " * 40, BAD, tokenizer, 96, 48)
    text = shown(prompt, tokenizer)
    assert shortened and len(prompt) == 48 and prompt[0] == 1
    assert text.startswith("[INST] word word") and text.endswith("word The end. [/INST]")
    assert len(prompt) + len(chosen) == 96 and chosen[-1] != EOS  # the long answer gets what is left


def test_a_prompt_is_shortened_only_when_the_pair_does_not_fit(tokenizer):
    question = "word " * 60
    full, *_ = fit_pair([user(question)], GOOD, BAD, tokenizer, 512, 48)
    assert fit_pair([user(question)], GOOD, BAD, tokenizer, len(full) + 20, 48)[::3] == (full, False)  # it fits
    long_answer = "More. " * 200  # a prompt within max_prompt_length stays whole; the answer is cut instead
    prompt, chosen, _, shortened = fit_pair([user(QUESTION)], long_answer, BAD, tokenizer, 96, 48)
    assert not shortened and shown(prompt, tokenizer) == f"[INST] {QUESTION} [/INST]"
    assert len(prompt) + len(chosen) == 96


def test_the_report_counts_shortened_prompts(tokenizer, tmp_path):
    rows = [PAIR, {"prompt": "word " * 300, "chosen": GOOD, "rejected": BAD}]
    report = load(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_length=96, max_prompt_length=48).reports[0]
    assert report.prompts_shortened == 1 and report.kept == 2
    assert "dropped 0; 1 long prompt(s) shortened; " in report.line()


def test_builtin_preferences(tokenizer):
    data = load("builtin:preferences", tokenizer)
    assert data.reports[0].read == data.reports[0].kept >= 40
    assert all(row["chosen_ids"] != row["rejected_ids"] for row in data.train)


def test_hub_layout_from_a_local_dataset_folder(tokenizer, tmp_path):
    # ultrafeedback_binarized's hub layout: data/{split}-*.parquet with splits train_prefs and test_prefs.
    import datasets

    user = {"role": "user", "content": QUESTION}
    row = {
        "prompt": QUESTION,
        "chosen": [user, {"role": "assistant", "content": GOOD}],
        "rejected": [user, {"role": "assistant", "content": BAD}],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    (tmp_path / "uf" / "data").mkdir(parents=True)
    for split, n in (("train_prefs", 6), ("test_prefs", 2)):
        datasets.Dataset.from_list([row] * n).to_parquet(tmp_path / "uf" / "data" / f"{split}-00000-of-00001.parquet")
    data = load(tmp_path / "uf", tokenizer, split="train_prefs", eval_split="test_prefs")
    assert (len(data.train), len(data.eval)) == (6, 2)
    assert [r.source for r in data.reports] == [f"{tmp_path / 'uf'} [train_prefs]", f"{tmp_path / 'uf'} [test_prefs]"]


# --- bad rows ----------------------------------------------------------------------------------------

BAD_ROWS = [
    {"prompt": QUESTION, "rejected": BAD},  # missing chosen
    {"prompt": QUESTION, "chosen": GOOD, "rejected": GOOD},  # chosen identical to rejected
    {"prompt": "  ", "chosen": GOOD, "rejected": BAD},  # empty prompt
    {"prompt": QUESTION, "chosen": 42, "rejected": BAD},  # wrong type
    {"prompt": {"text": QUESTION}, "chosen": GOOD, "rejected": BAD},  # wrong type
    {"prompt": QUESTION, "chosen": [{"role": "user", "content": GOOD}], "rejected": BAD},  # no answer turn
]


def test_bad_rows_are_counted_and_dropped(tokenizer, tmp_path):
    data = load(write_jsonl(tmp_path / "bad.jsonl", [PAIR] * 54 + BAD_ROWS), tokenizer)
    report = data.reports[0]
    assert (report.read, report.kept, len(data.train)) == (60, 54, 54)
    assert report.dropped == {
        "missing chosen": 1,
        "chosen identical to rejected": 1,
        "empty prompt": 1,
        "chosen is not a string or a list of turns": 1,
        "prompt is not a string or a list of turns": 1,
        "chosen does not end on an assistant turn": 1,
    }
    line = report.line()
    assert "read 60, kept 54, dropped 6" in line and "chosen identical to rejected: 1" in line


def test_too_many_bad_rows_stop_the_run(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIR] * 24 + BAD_ROWS)  # 20% bad
    with pytest.raises(UserError, match=r"20% of rows .* are unparseable .*data.max_bad_fraction \(now 0.1\)"):
        load(path, tokenizer)
    assert len(load(path, tokenizer, max_bad_fraction=0.25).train) == 24


def test_missing_columns_name_the_layout(tokenizer, tmp_path):
    with pytest.raises(UserError, match="conversations, not preference pairs .*train.method: sft"):
        load(write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}]), tokenizer)
