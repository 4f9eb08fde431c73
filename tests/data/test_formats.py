"""data/formats.py: every public dataset layout in tests/samples loads, is detected, encodes as mistral-common does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_ft.data.conversations import load_sft_data
from mixtral_ft.data.formats import completion_only, parse_hh
from mixtral_ft.data.prefs import load_preference_data
from mixtral_ft.data.tokenizer import bundled_tokenizer_file
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection

DATA = Path(__file__).resolve().parents[1] / "samples"
EOS = 2


@pytest.fixture(scope="module")
def prompter():  # test mode encodes a prompt that ends on a user turn: where the answer starts, independently
    return MistralTokenizer.from_file(str(bundled_tokenizer_file()), mode=ValidationMode.test)


def sft(path, tokenizer, **data):
    return load_sft_data(DataSection(path=str(path), **data), tokenizer, max_length=512, seed=0)


def prefs(path, tokenizer, **data):
    return load_preference_data(
        DataSection(path=str(path), **data), tokenizer, max_length=512, max_prompt_length=256, seed=0
    )


def encode(reference, *turns: str) -> list[int]:
    messages = [(UserMessage if i % 2 == 0 else AssistantMessage)(content=c) for i, c in enumerate(turns)]
    return reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def prompt_length(prompter, *turns: str) -> int:
    return len(encode(prompter, *turns))


# --- SFT formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt, kept",
    [
        ("messages_system.jsonl", "messages", 3),
        ("sharegpt.jsonl", "sharegpt", 3),
        ("alpaca.jsonl", "alpaca", 4),
        ("prompt_completion.jsonl", "prompt_completion", 3),
        ("prompt_completion_conversational.jsonl", "prompt_completion", 3),
    ],
)
def test_each_sft_format_is_detected_and_reported(tokenizer, name, fmt, kept):
    data = sft(DATA / name, tokenizer)
    report = data.reports[0]
    assert (report.format, report.kept, report.dropped) == (f"{fmt} (auto-detected)", kept, {})
    assert f"format {fmt} (auto-detected), read {kept}, kept {kept}" in report.line()
    assert report.supervised_tokens == sum(sum(m) for m in data.train["assistant_masks"]) > 0
    assert f"{report.supervised_tokens:,} supervised tokens" in report.line()


def test_explicit_format_is_reported_without_auto(tokenizer):
    assert sft(DATA / "alpaca.jsonl", tokenizer, format="alpaca").reports[0].format == "alpaca"


def test_system_turn_is_folded_into_the_first_user_turn(tokenizer, reference):
    row = sft(DATA / "messages_system.jsonl", tokenizer).train[0]
    assert row["input_ids"] == encode(reference, "You are terse.\n\nWhat is the capital of France?", "Paris.")


def test_sharegpt_rows_encode_like_messages(tokenizer, reference):
    rows = sft(DATA / "sharegpt.jsonl", tokenizer).train
    assert rows[0]["input_ids"] == encode(reference, "How many legs does a spider have?", "Eight.")
    assert rows[1]["input_ids"] == encode(
        reference, "Be brief.\n\nBoiling point of water in Celsius?", "100 degrees at sea level."
    )


def test_alpaca_input_joins_the_instruction_and_ids_match_mistral_common(tokenizer, reference, prompter):
    rows = sft(DATA / "alpaca.jsonl", tokenizer).train
    user = "Translate to French.\n\nGood morning"
    ids, mask = rows[0]["input_ids"], rows[0]["assistant_masks"]
    assert ids == encode(reference, user, "Bonjour")
    start = prompt_length(prompter, user)
    assert mask == [0] * start + [1] * (len(ids) - start)  # exactly the output and its </s>
    assert ids[-1] == EOS and tokenizer.decode(ids[start:], skip_special_tokens=True).strip() == "Bonjour"
    # an empty input, and no input column value at all, leave the instruction alone
    assert rows[1]["input_ids"] == encode(reference, "Give three primary colours.", "Red, blue and yellow.")
    assert rows[3]["input_ids"] == encode(reference, "Name the largest planet.", "Jupiter.")


def test_prompt_completion_string_trains_on_the_completion_only(tokenizer, reference, prompter):
    row = sft(DATA / "prompt_completion.jsonl", tokenizer).train[0]
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert ids == encode(reference, "The capital of Italy is", "Rome.")
    start = prompt_length(prompter, "The capital of Italy is")
    assert mask == [0] * start + [1] * (len(ids) - start)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True).strip() == "Rome."


def test_conversational_prompt_completion_masks_no_answer_inside_the_prompt(tokenizer, reference, prompter):
    row = sft(DATA / "prompt_completion_conversational.jsonl", tokenizer).train[1]
    turns = ("Hi", "Hello! How can I help?", "Name a fruit.", "Apple.")
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert ids == encode(reference, *turns)
    start = prompt_length(prompter, *turns[:3])
    assert mask == [0] * start + [1] * (len(ids) - start)  # "Hello! How can I help?" is context, not a target


def test_completion_only_drops_the_leading_runs():
    assert completion_only([0, 1, 1, 0, 0, 1, 0, 1, 1], 2) == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert completion_only([0, 1, 1, 0, 1], 0) == [0, 1, 1, 0, 1]


def test_trailing_user_turns_are_counted(tokenizer):
    report = sft(DATA / "trailing_user.jsonl", tokenizer).reports[0]
    assert report.kept == 2 and report.trailing_user_dropped == 1
    assert "1 unanswered last user turn(s) cut" in report.line()


def test_parquet_is_detected_too(tokenizer, tmp_path):
    path = tmp_path / "alpaca.parquet"
    datasets.load_dataset("json", data_files=str(DATA / "alpaca.jsonl"), split="train").to_parquet(str(path))
    assert sft(path, tokenizer).reports[0].format == "alpaca (auto-detected)"


def test_save_to_disk_folders_load(tokenizer, tmp_path):
    rows = datasets.load_dataset("json", data_files=str(DATA / "sharegpt.jsonl"), split="train")
    rows.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert sft(tmp_path / "one", tokenizer).reports[0].kept == 3
    both = sft(tmp_path / "dict", tokenizer, eval_split="test")
    assert (len(both.train), len(both.eval)) == (3, 1)
    with pytest.raises(UserError, match="saved from one Dataset.*data.split: train"):
        sft(tmp_path / "one", tokenizer, split="test")
    with pytest.raises(UserError, match=r"has splits \['train', 'test'\], not 'validation'"):
        sft(tmp_path / "dict", tokenizer, split="validation")


# --- errors -------------------------------------------------------------------------------------------


def test_unknown_columns_list_the_columns_the_formats_and_the_key(tokenizer):
    with pytest.raises(UserError) as err:
        sft(DATA / "unknown_columns.jsonl", tokenizer)
    message = str(err.value)
    assert "['question', 'answer']" in message and "data.format" in message
    for fmt in ("messages", "sharegpt", "chatml", "alpaca", "prompt_completion"):
        assert f"{fmt}:" in message
    assert "max_bad_fraction" not in message and "\n" not in message


def test_a_format_that_does_not_match_says_what_it_needs(tokenizer):
    with pytest.raises(UserError, match=r"data.format: alpaca needs instruction and output.*set data.format to auto"):
        sft(DATA / "sharegpt.jsonl", tokenizer, format="alpaca")


def test_preference_data_for_sft_points_at_dpo(tokenizer):
    with pytest.raises(UserError, match="preference pairs.*train.method: dpo"):
        sft(DATA / "hh_rlhf.jsonl", tokenizer)


def test_nothing_parseable_does_not_suggest_max_bad_fraction(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"chosen": "Yes.", "rejected": "No."}) + "\n")
    with pytest.raises(UserError) as err:
        prefs(path, tokenizer)
    assert "read as implicit_prompt" in str(err.value) and "max_bad_fraction" not in str(err.value)


# --- preference formats --------------------------------------------------------------------------------


def test_hh_text_takes_the_shared_start_as_the_prompt(tokenizer, reference):
    data = prefs(DATA / "hh_rlhf.jsonl", tokenizer)
    assert data.reports[0].format == "implicit_prompt (auto-detected)" and data.reports[0].kept == 3
    row = data.train[1]
    context = ("Hi there", "Hello! How can I help?", "How do I boil an egg?")
    assert row["prompt_ids"] + row["chosen_ids"] == encode(
        reference, *context, "Simmer it in water for about nine minutes."
    )
    assert row["prompt_ids"] + row["rejected_ids"] == encode(reference, *context, "Put it in the microwave.")


def test_hh_message_lists_and_ultrafeedback(tokenizer, reference):
    hh = prefs(DATA / "hh_rlhf_messages.jsonl", tokenizer)
    assert hh.reports[0].format == "implicit_prompt (auto-detected)" and hh.reports[0].kept == 2
    row = hh.train[1]
    assert row["prompt_ids"] + row["chosen_ids"] == encode(
        reference, "Hi", "Hello!", "Is ice cold?", "Yes, ice is cold."
    )
    uf = prefs(DATA / "ultrafeedback.jsonl", tokenizer)
    assert uf.reports[0].format == "preference (auto-detected)" and uf.reports[0].kept == 2


def test_parse_hh():
    assert parse_hh("\n\nHuman: Hi\n\nAssistant: Hello") == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    with pytest.raises(ValueError, match="add a prompt column"):
        parse_hh("Just an answer.")


def test_recipe_accepts_the_new_formats():
    from mixtral_ft.recipe import load_recipe

    root = Path(__file__).resolve().parents[2]
    for fmt in ("alpaca", "prompt_completion", "sharegpt"):
        assert load_recipe(root / "recipes" / "tiny.yaml", [f"data.format={fmt}"]).data.format == fmt
    assert load_recipe(root / "recipes" / "tiny_dpo.yaml", ["data.format=implicit_prompt"]).data.format
    with pytest.raises(UserError, match="'data.format' must be one of auto, preference, implicit_prompt"):
        load_recipe(root / "recipes" / "tiny_dpo.yaml", ["data.format=alpaca"])


def test_a_mixture_of_formats(tokenizer):
    from mixtral_ft.recipe import MixtureSource

    cfg = DataSection(
        mixture=(
            MixtureSource(path=str(DATA / "alpaca.jsonl")),
            MixtureSource(path=str(DATA / "sharegpt.jsonl")),
        )
    )
    data = load_sft_data(cfg, tokenizer, max_length=512, seed=0)
    assert [r.format for r in data.reports] == ["alpaca (auto-detected)", "sharegpt (auto-detected)"]
    assert len(data.train) == 7
    assert dataclasses.replace(cfg).mixture[0].format is None


def test_unknown_preference_columns_list_the_preference_formats(tokenizer):
    with pytest.raises(
        UserError,
        match=r"\['question', 'answer'\].*preference: prompt, chosen and rejected.*"
        r"implicit_prompt: chosen and rejected.*data.format",
    ):
        prefs(DATA / "unknown_columns.jsonl", tokenizer)


def test_train_on_an_alpaca_file_end_to_end(tmp_path, capsys):
    from mixtral_ft.cli import main

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(root / "recipes" / "tiny.yaml"),
            f"data.path={DATA / 'alpaca.jsonl'}",
            "data.test_size=0",
            f"train.output_dir={out}",
            "train.max_steps=2",
            "train.save_steps=2",
            "train.logging_steps=1",
            "logging.router_stats_steps=0",
        ]
    )
    assert code == 0
    assert "format alpaca (auto-detected), read 4, kept 4, dropped 0" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["steps"] == 2


def test_readme_shows_one_row_of_every_format():
    from mixtral_ft.recipe import PREFERENCE_FORMATS, SFT_FORMATS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    data = readme.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    for fmt in (*SFT_FORMATS, *PREFERENCE_FORMATS):
        assert f"| `{fmt}`" in data, fmt
    assert "data.path=tests/samples/alpaca.jsonl" in data


def test_alpaca_with_a_rendered_text_column_is_still_alpaca(tokenizer, reference, tmp_path):
    # tatsu-lab/alpaca ships its rendered prompt in `text` beside instruction/input/output.
    row = {
        "instruction": "Add the numbers.",
        "input": "1, 2",
        "output": "3",
        "text": "Below is an instruction...\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n3",
    }
    path = tmp_path / "alpaca_text.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = sft(path, tokenizer)
    assert data.reports[0].format == "alpaca (auto-detected)"
    assert data.train[0]["input_ids"] == encode(reference, "Add the numbers.\n\n1, 2", "3")
