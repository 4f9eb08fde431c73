"""`mixtral-ft data`'s summary and rendering, on real rows from the real tokenizer: the marked spans are what trains."""

import json
import re
from pathlib import Path

import pytest

from mixtral_ft.data.conversations import normalize_messages
from mixtral_ft.data.files import BUILTIN
from mixtral_ft.data.formats import sft_format
from mixtral_ft.data.preview import (
    MARK,
    decode,
    preview,
    render,
    show_rows,
    spread,
    summarize,
)
from mixtral_ft.data.rows import dpo_rows, sft_rows
from mixtral_ft.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY, TINY_DPO = str(ROOT / "recipes" / "tiny.yaml"), str(ROOT / "recipes" / "tiny_dpo.yaml")
SPAN = re.compile(f"{MARK[0]}(.*?){MARK[1]}", flags=re.S)


def recipe(path: str, *overrides: str):
    return load_recipe(path, ["data.test_size=0", *overrides])


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return str(path)


def assistant_turns(row: dict) -> list[str]:
    return [t["content"] for t in normalize_messages(row["messages"]) if t["role"] == "assistant"]


def test_spread_is_nearest_rank():
    assert spread(list(range(20, 0, -1))) == {"min": 1, "median": 10, "p95": 19, "max": 20}
    assert spread([7]) == {"min": 7, "median": 7, "p95": 7, "max": 7}


def test_marked_spans_are_exactly_the_assistant_turns_and_their_eos(tokenizer, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Two lines, please."},
                {"role": "assistant", "content": "Line one,\nline two ; « ok » — ça va."},
                {"role": "user", "content": "And 2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
    ]
    data = sft_rows(recipe(TINY, f"data.path={write_jsonl(tmp_path / 'c.jsonl', rows)}"), tokenizer)
    for row, source in zip(data.train, rows):
        text = render(row["input_ids"], row["assistant_masks"], tokenizer, color=False)
        assert SPAN.findall(text) == [content + "</s>" for content in assistant_turns(source)]
        assert text.startswith("<s> [INST] ") and "\x1b" not in text


def test_builtin_sample_renders_every_answer_marked(tokenizer):
    """The bundled oasst rows (French « » quotes among them): each marked span is an answer, in order."""
    data = sft_rows(recipe(TINY, "train.max_length=4096"), tokenizer)
    source = [json.loads(line) for line in Path(BUILTIN["oasst_top1"]).read_text().splitlines()]
    fmt = sft_format(list(source[0]), source[0], "auto", "builtin")
    shown = show_rows(data, "sft", tokenizer, len(source), color=False)[1::2]  # header, text; header, text; ...
    assert len(data.train) == len(source) == len(shown)
    for text, raw in zip(shown, source):
        messages = normalize_messages(fmt.convert(raw)[0])
        answers = [t["content"] + "</s>" for t in messages if t["role"] == "assistant"]
        assert SPAN.findall(text) == answers


def test_colour_marks_the_same_spans(tokenizer):
    data = sft_rows(recipe(TINY), tokenizer)
    row = data.train[0]
    plain = render(row["input_ids"], row["assistant_masks"], tokenizer, color=False)
    green = render(row["input_ids"], row["assistant_masks"], tokenizer, color=True)
    assert "\x1b[32m" in green and MARK[0] not in green
    assert green.replace("\x1b[32m", MARK[0]).replace("\x1b[0m", MARK[1]) == plain


def test_decode_shows_special_tokens_and_spaces(tokenizer):
    ids = tokenizer.tokenizer.instruct_tokenizer.tokenizer.encode("[INST] Hi [/INST] Yes", bos=True, eos=True)
    assert decode(ids, tokenizer) == "<s> [INST] Hi [/INST] Yes</s>"


@pytest.mark.parametrize("max_length", [64, 256])
def test_sft_summary_agrees_with_the_data_reports(tokenizer, max_length):
    data = sft_rows(load_recipe(TINY, [f"train.max_length={max_length}"]), tokenizer)
    summary = summarize(data, "sft", max_length, tokenizer.eos_token_id)
    train, held = summary["train"], summary["eval"]
    assert train["rows"] + held["rows"] == sum(r.kept for r in data.reports) == 66
    assert train["supervised_tokens"] + held["supervised_tokens"] == sum(r.supervised_tokens for r in data.reports)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert train["tokens"] == sum(lengths) and train["tokens_per_row"]["max"] == max(lengths) <= max_length
    assert train["at_max_length"] == lengths.count(max_length)
    if max_length == 64:  # most answers run past 64 tokens: cut inside, without their </s>
        assert 0 < train["cut_mid_answer"] <= train["at_max_length"]
    else:
        assert train["cut_mid_answer"] == 0


def test_sft_summary_without_assistant_only_loss_counts_every_token_but_bos(tokenizer):
    data = sft_rows(recipe(TINY, "train.assistant_only_loss=false"), tokenizer)
    summary = summarize(data, "sft", 256, tokenizer.eos_token_id)
    assert summary["train"]["supervised_tokens"] == data.reports[0].supervised_tokens == summary["train"]["tokens"] - 66
    [shown] = show_rows(data, "sft", tokenizer, 1, color=False)[1:]
    assert shown.startswith(f"<s>{MARK[0]}") or shown.startswith(f"<s> {MARK[0]}")


def test_dpo_rows_render_prompt_and_both_answers(tokenizer, tmp_path):
    pairs = [{"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five, surely."}]
    data = dpo_rows(recipe(TINY_DPO, f"data.path={write_jsonl(tmp_path / 'p.jsonl', pairs)}"), tokenizer)
    header, prompt, chosen, rejected = show_rows(data, "dpo", tokenizer, 3, color=False)
    row = data.train[0]
    sizes = ", ".join(f"{part} {len(row[part + '_ids'])} ids" for part in ("prompt", "chosen", "rejected"))
    assert header.startswith(f"--- train pair 1 of 1: {sizes}")
    assert prompt == "prompt:   <s> [INST] What is 2+2? [/INST]"
    assert SPAN.findall(chosen) == ["It is 4.</s>"] and chosen.startswith("chosen:")
    assert SPAN.findall(rejected) == ["Five, surely.</s>"] and rejected.startswith("rejected:")


def test_dpo_summary_counts_pairs_lengths_and_cut_answers(tokenizer):
    for max_length, cut in ((192, False), (40, True)):
        data = dpo_rows(
            load_recipe(TINY_DPO, [f"train.max_length={max_length}", "dpo.max_prompt_length=16"]), tokenizer
        )
        summary = summarize(data, "dpo", max_length, tokenizer.eos_token_id)
        train, held = summary["train"], summary["eval"]
        assert train["pairs"] + held["pairs"] == sum(r.kept for r in data.reports) == 48
        assert train["supervised_tokens"] + held["supervised_tokens"] == data.reports[0].supervised_tokens
        assert train["prompt_tokens"]["max"] == max(len(ids) for ids in data.train["prompt_ids"])
        eos = tokenizer.eos_token_id
        lost = sum(c[-1] != eos or r[-1] != eos for c, r in zip(data.train["chosen_ids"], data.train["rejected_ids"]))
        assert train["cut"] == lost and (lost > 0) == cut


def test_preview_json_holds_summary_and_shown_rows(tokenizer):
    out = json.loads(preview(load_recipe(TINY), tokenizer, show=2, color=False, as_json=True))
    assert out["summary"]["train"]["rows"] == 59 and len(out["rows"]) == 2
    first = out["rows"][0]
    assert len(first["input_ids"]) == len(first["trained_mask"]) and SPAN.findall(first["text"])
    assert out["reports"][0]["kept"] == 66
