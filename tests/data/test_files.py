"""mixtral_ft.data.files through the SFT loader: local .jsonl/.json/.parquet files, dataset folders and hub ids,
bad rows counted and dropped, and every unreadable source a one-line error."""

from __future__ import annotations

import json

import datasets
import pytest

from mixtral_ft.data.conversations import load_sft_data
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection, MixtureSource
from tests.conftest import chatml
from tests.data.test_conversations import EOS, convo, masked_runs, write_jsonl


def bad_rows():
    good = [{"text": chatml(("user", f"Question {i}?"), ("assistant", f"Answer {i}."))} for i in range(7)]
    return good + [
        {"text": "not chatml at all"},
        {"text": chatml(("user", "Hi"), ("assistant", "  "))},
        {"text": chatml(("user", "Anyone?"))},
    ]


def test_bad_rows_are_counted_and_dropped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", bad_rows())
    data = load_sft_data(DataSection(path=str(path), max_bad_fraction=0.5), tokenizer, max_length=512, seed=0)
    report = data.reports[0]
    assert (report.read, report.kept, len(data.train)) == (10, 7, 7)
    reasons = ["empty assistant turn", "no assistant turn", "no ChatML turns (<|im_start|>role ... <|im_end|>)"]
    assert report.dropped == dict.fromkeys(reasons, 1)
    assert report.line().startswith(
        f"data: {path} [train]: format chatml (auto-detected), read 10, kept 7, dropped 3 (empty assistant turn: 1, "
    )


def test_too_many_bad_rows_is_a_user_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", bad_rows())
    with pytest.raises(UserError, match=r"30% of rows in .*mixed.jsonl \[train\] are unparseable.*max_bad_fraction"):
        load_sft_data(DataSection(path=str(path)), tokenizer, max_length=512, seed=0)


def test_truncation_keeps_rows_with_assistant_tokens(tmp_path, tokenizer):
    rows = [
        {"messages": convo("Hi", "Hello there, how can I help you today?")},
        {"messages": convo("word " * 40, "Too late.")},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    data = load_sft_data(DataSection(path=str(path)), tokenizer, max_length=16, seed=0)
    assert data.reports[0].dropped == {"no assistant tokens within max_length": 1}
    (ids,), (mask,) = data.train["input_ids"], data.train["assistant_masks"]
    assert len(ids) == len(mask) == 16 and mask[-1] == 1 and ids[-1] != EOS


def test_parquet_with_messages_column(tmp_path, tokenizer):
    path = tmp_path / "chat.parquet"
    rows = {
        "messages": [convo("Hola, ¿qué tal?", "Muy bien, gracias."), convo("2+2?", "4", "3+3?", "6")],
        "id": ["a", "b"],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    data = load_sft_data(DataSection(path=str(path)), tokenizer, max_length=512, seed=0)
    assert data.reports[0].kept == 2
    assert [len(masked_runs(i, m)) for i, m in zip(data.train["input_ids"], data.train["assistant_masks"])] == [1, 2]


def test_json_list_with_sharegpt_conversations(tmp_path, tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}] * 3
    path = tmp_path / "share.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    data = load_sft_data(DataSection(path=str(path), format="messages"), tokenizer, max_length=512, seed=0)
    assert data.reports[0].kept == 3


def test_local_dataset_folder_with_eval_split(tmp_path, tokenizer):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": chatml(("user", f"Q{i}"), ("assistant", f"A{i}"))} for i in range(4)])
    write_jsonl(folder / "test.jsonl", [{"text": chatml(("user", "Q"), ("assistant", "A"))}] * 2)
    cfg = DataSection(path=str(folder), eval_split="test", test_size=0.5)
    data = load_sft_data(cfg, tokenizer, max_length=512, seed=0)
    assert (len(data.train), len(data.eval)) == (4, 2)
    assert [r.source for r in data.reports] == [f"{folder} [train]", f"{folder} [test]"]
    with pytest.raises(UserError, match="local dataset folder.*validation"):
        load_sft_data(DataSection(path=str(folder), split="validation"), tokenizer, max_length=512, seed=0)


def test_hub_id_that_cannot_be_reached_is_a_user_error(monkeypatch, tokenizer):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    with pytest.raises(UserError, match="cannot load hub dataset 'no-such-org/no-such-dataset'") as info:
        load_sft_data(DataSection(path="no-such-org/no-such-dataset"), tokenizer, max_length=512, seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.jsonl", None, "file '.*missing.jsonl' not found; fix data.path"),
        ("data.csv", "a,b\n1,2\n", "unsupported extension '.csv'"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": \n', "line 2 of .* is not valid JSON"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "line 1 of .* is not UTF-8"),
        ("broken.json", '[{"text": "ok"},\n{"text": ]\n', "cannot read .* as JSON"),
        ("broken.parquet", "not parquet", "cannot read .* as Parquet"),
        ("empty.jsonl", "\n", "has no rows"),
        ("array.jsonl", '{"text": "ok"}\n[1, 2]\n', "line 2 of .* is a JSON list, not an object"),
        ("number.jsonl", '{"text": "ok"}\n5\n', "line 2 of .* is a JSON number, not an object"),
        (
            "other.jsonl",
            '{"prompt": "a", "answer": "b"}\n',
            r"columns \['prompt', 'answer'\].*messages:.*chatml: a text column.*data.format",
        ),
    ],
)
def test_bad_sources_are_user_errors(tmp_path, tokenizer, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match):
        load_sft_data(DataSection(path=str(path)), tokenizer, max_length=512, seed=0)


def test_a_bad_file_error_is_the_only_thing_on_stderr(tmp_path, tokenizer, capsys):
    # datasets drew its "Generating train split" bar for every new file, so the one-line error came third.
    path = tmp_path / "other.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="match no format"):
        load_sft_data(DataSection(path=str(path)), tokenizer, max_length=512, seed=0)
    assert capsys.readouterr().err == ""


def test_wrong_format_or_split_for_a_file_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="data.format: messages needs a messages/conversation"):
        load_sft_data(DataSection(path="builtin:oasst_top1", format="messages"), tokenizer, max_length=512, seed=0)
    with pytest.raises(UserError, match="only a 'train' split"):
        load_sft_data(DataSection(path="builtin:oasst_top1", eval_split="test"), tokenizer, max_length=512, seed=0)
    # In a mixture the keys to change are the entry's: data.split / data.eval_split are refused beside it.
    mixture = DataSection(mixture=(MixtureSource(path="builtin:oasst_top1", eval_split="test"),))
    with pytest.raises(UserError, match="in data.mixture, set that entry's split: train and drop its eval_split"):
        load_sft_data(mixture, tokenizer, max_length=512, seed=0)
    with pytest.raises(UserError, match="unknown built-in dataset 'nope'"):
        load_sft_data(DataSection(path="builtin:nope"), tokenizer, max_length=512, seed=0)
