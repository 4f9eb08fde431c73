"""Tokenizing through Dataset.map: the same rows and reports in any number of processes, and from the cache."""

import dataclasses
import json
from pathlib import Path

import pytest
from datasets import Dataset

from mixtral_ft.data import encode
from mixtral_ft.data.conversations import load_sft_data
from mixtral_ft.data.prefs import load_preference_data
from mixtral_ft.recipe import DataSection


def columns(dataset) -> dict:
    return {name: dataset[name][:] for name in dataset.column_names}


def sft(tokenizer, cfg, **kwargs):
    return load_sft_data(cfg, tokenizer, max_length=kwargs.pop("max_length", 256), seed=0, **kwargs)


def dpo(tokenizer, cfg):
    return load_preference_data(cfg, tokenizer, max_length=96, max_prompt_length=48, seed=0)


def messy_file(tmp_path):
    """Good rows, bad rows of several kinds and a row too long for max_length, mixed."""
    good = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    trailing = {"messages": [*good["messages"], {"role": "user", "content": "and then?"}]}
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    bad = [{"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}, {"messages": [good["messages"][1]]}]
    rows = [good, trailing, *bad, long] * 5 + [good] * 12
    path = tmp_path / "messy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSection(path=str(path), max_bad_fraction=0.9)


@pytest.mark.parametrize("source", ["builtin", "messy"])
def test_two_processes_give_the_same_rows_and_report_as_one(tokenizer, tmp_path, source):
    cfg = DataSection(path="builtin:oasst_top1") if source == "builtin" else messy_file(tmp_path)
    one = sft(tokenizer, dataclasses.replace(cfg, num_proc=1))
    two = sft(tokenizer, dataclasses.replace(cfg, num_proc=2))
    assert len(one.train) > 10 and columns(one.train) == columns(two.train)
    assert one.reports == two.reports
    if source == "messy":  # every kind of drop is counted, in either case
        report = one.reports[0]
        assert (report.read, report.kept, report.trailing_user_dropped) == (42, 22, 5)
        assert report.dropped == {
            "empty conversation": 5,
            "first turn is assistant, not user": 5,
            "no assistant tokens within max_length": 5,
            "unknown role 'robot'": 5,
        }


def test_preference_pairs_in_two_processes_equal_one(tokenizer):
    cfg = DataSection(path="builtin:preferences")
    one, two = (dpo(tokenizer, dataclasses.replace(cfg, num_proc=n)) for n in (1, 2))
    assert set(one.train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    assert columns(one.train) == columns(two.train) and one.reports == two.reports


def test_a_second_load_reads_the_cache_and_gives_the_same_rows(tokenizer, tmp_path):
    cfg = messy_file(tmp_path)
    first = sft(tokenizer, cfg)
    files = [f["filename"] for f in first.train.cache_files]
    assert any("cache-" in name for name in files)  # the tokenized rows are an Arrow cache file, not in memory
    stamps = {name: Path(name).stat().st_mtime_ns for name in files}
    second = sft(tokenizer, cfg)
    assert [f["filename"] for f in second.train.cache_files] == files
    assert {name: Path(name).stat().st_mtime_ns for name in files} == stamps  # read, not written again
    assert columns(first.train) == columns(second.train) and first.reports == second.reports


def test_every_setting_the_ids_depend_on_changes_the_cache(tokenizer, tmp_path):
    cfg = messy_file(tmp_path)
    base = sft(tokenizer, cfg)
    for other in (
        sft(tokenizer, cfg, max_length=64),
        sft(tokenizer, cfg, assistant_only=False),
        sft(tokenizer, dataclasses.replace(cfg, format="sharegpt")),  # read alike, but another format
    ):
        assert other.train.cache_files[0]["filename"] != base.train.cache_files[0]["filename"]
    assert base.reports[0].supervised_tokens != sft(tokenizer, cfg, assistant_only=False).reports[0].supervised_tokens


def test_the_fingerprint_covers_source_settings_and_code(tokenizer):
    rows = Dataset.from_dict({"text": ["a", "b"]})
    key = encode.fingerprint(rows, {"max_length": 8}, tokenizer)
    assert key == encode.fingerprint(rows, {"max_length": 8}, tokenizer)
    assert key != encode.fingerprint(rows, {"max_length": 9}, tokenizer)
    assert key != encode.fingerprint(rows.select([1, 0]), {"max_length": 8}, tokenizer)
    # The modules that decide the ids are hashed: a file missing from CODE would not invalidate the cache.
    package = Path(encode.__file__).parent
    assert {"conversations.py", "prefs.py", "formats.py", "encode.py"} <= set(encode.CODE)
    assert all((package / name).is_file() for name in encode.CODE)


def test_rows_in_memory_are_computed_without_a_cache(tokenizer):
    rows = Dataset.from_dict({"n": [1, -1, 2, 3]})

    def halve(row):
        if row["n"] < 0:
            raise ValueError("negative")
        return {"ids": [row["n"]] * row["n"], "_count": row["n"]}

    kept, dropped, sums = encode.encode_rows(
        rows, halve, {"ids": "ids", "_count": "count"}, {}, tokenizer=tokenizer, num_proc=2, label="numbers"
    )
    assert kept.cache_files == [] and kept.column_names == ["ids"]
    assert kept["ids"][:] == [[1], [2, 2], [3, 3, 3]]
    assert dropped == {"negative": 1} and sums == {"_count": 6}


def test_processes_by_rows_and_cores(monkeypatch):
    monkeypatch.setattr(encode.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert encode.processes(3, 10) == 3  # data.num_proc wins
    assert encode.processes(None, encode.ROWS_PER_PROCESS * 2 - 1) == 1  # small: processes cost more than they save
    assert encode.processes(None, encode.ROWS_PER_PROCESS * 5) == 5
    assert encode.processes(None, 10**7) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on the machine: 2 cores each
    assert encode.processes(None, 10**7) == 2


def test_the_cache_holds_5_bytes_a_token(tokenizer, tmp_path):
    # int32 ids and int8 masks; with int64 for both a 280 M-token dataset's cache was 4.5 GB instead of 1.4.
    rows = sft(tokenizer, messy_file(tmp_path)).train
    assert rows.features["input_ids"].feature.dtype == "int32"
    assert rows.features["assistant_masks"].feature.dtype == "int8"
    pairs = dpo(tokenizer, DataSection(path="builtin:preferences")).train
    assert {pairs.features[name].feature.dtype for name in ("prompt_ids", "chosen_ids", "rejected_ids")} == {"int32"}
