"""Preference pairs for DPO: read prompt/chosen/rejected rows, tokenize them in Mixtral's chat format.

Accepted rows (columns `prompt`, `chosen`, `rejected`):
- strings: `prompt` is the user's message, `chosen` / `rejected` the assistant's answers;
- TRL's conversational layout: `prompt` a list of turns ending on a user turn, `chosen` / `rejected` lists
  holding the one answer turn;
- Anthropic HH-RLHF (`implicit_prompt`, formats.py): `chosen` / `rejected` whole dialogues without a `prompt`,
  as `\n\nHuman: … \n\nAssistant: …` text or lists of turns; their shared start is the prompt;
- HuggingFaceH4/ultrafeedback_binarized (and the bundled `builtin:preferences`): `chosen` / `rejected` are
  whole conversations that include the prompt turns; those turns are the prompt, and the `prompt` column,
  which only repeats the question, may be absent.
Each pair becomes `prompt_ids` (`<s>[INST] … [/INST]`) plus `chosen_ids` / `rejected_ids` (answer tokens and
`</s>`): mistral-common's own encoding of prompt + answer, cut where the answer starts. train/dpo.py hands these ids
to TRL as they are, because TRL's tokenization goes through `apply_chat_template`, which MistralCommonBackend
cannot do for a pair (finetuning mode refuses a prompt that ends on a user turn, test mode refuses an answer).
Bad pairs are dropped and counted per reason, exactly like bad SFT rows (conversations.py).
A pair over train.max_length is fitted by `fit_pair`: a long prompt loses whole old exchanges, then the start of
its question, never `<s>[INST]` or its end; the answers lose their ends. The reports count shortened prompts.
"""

from __future__ import annotations

import os
from functools import partial

from mixtral_ft.data import formats
from mixtral_ft.data.conversations import (
    _finetuning_tokenizer,
    encode_conversation,
    normalize_messages,
)
from mixtral_ft.data.encode import encode_rows
from mixtral_ft.data.files import read_rows
from mixtral_ft.data.sources import SFTData, SourceReport, load_sources, settle
from mixtral_ft.recipe import DataSection

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def load_preference_data(cfg: DataSection, tokenizer, *, max_length: int, max_prompt_length: int, seed: int) -> SFTData:
    """Tokenized preference pairs for the recipe's data section (data.path or data.mixture), one report per split."""
    _finetuning_tokenizer(tokenizer)
    return load_sources(
        cfg, lambda one, split: _load_split(one, split, tokenizer, max_length, max_prompt_length), seed=seed
    )


def split_pair(row: dict) -> tuple[list[dict], str, str]:
    """(prompt turns, chosen answer, rejected answer) of one row; ValueError(reason) if it is not a usable pair."""
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise ValueError(f"missing {name}")
        if not isinstance(row[name], (str, list)):
            raise ValueError(f"{name} is not a string or a list of turns")
    chosen_context, chosen = _answer(row["chosen"], "chosen")
    rejected_context, rejected = _answer(row["rejected"], "rejected")
    if chosen_context or rejected_context:  # ultrafeedback layout: the answers carry the prompt turns
        if chosen_context != rejected_context:
            raise ValueError("chosen and rejected answer different prompts")
        turns = chosen_context
    else:
        prompt = row.get("prompt")
        if prompt is None:
            raise ValueError("missing prompt")
        if not isinstance(prompt, (str, list)):
            raise ValueError("prompt is not a string or a list of turns")
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("empty prompt")
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if chosen == rejected:
        raise ValueError("chosen identical to rejected")
    return turns, chosen, rejected


def _answer(value: str | list, name: str) -> tuple[list[dict], str]:
    """(turns before the answer, answer text) of a chosen/rejected value."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"empty {name}")
        return [], value.strip()
    if not value or not isinstance(value[-1], dict):
        raise ValueError(f"{name} is not a string or a list of turns")
    last = value[-1]
    if formats.turn_role(last) != "assistant":
        raise ValueError(f"{name} does not end on an assistant turn")
    if len(value) == 1:  # TRL's conversational layout: the answer turn alone
        content = last.get("content") if last.get("content") is not None else last.get("value")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"empty {name}")
        return [], content.strip()
    turns = normalize_messages(value)  # validates roles and order; ends on the answer (checked above)
    return turns[:-1], turns[-1]["content"]


def encode_pair(turns: list[dict], chosen: str, rejected: str, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Mixtral's finetuning encoding of prompt + each answer, split at the start of the answer."""
    ids = []
    for answer in (chosen, rejected):
        encoded = encode_conversation([*turns, {"role": "assistant", "content": answer}], tokenizer)
        mask = encoded["assistant_masks"]
        start = len(mask) - mask[::-1].index(0)  # the last assistant run (the answer and its </s>) ends the row
        ids.append((encoded["input_ids"][:start], encoded["input_ids"][start:]))
    (prompt, chosen_ids), (other_prompt, rejected_ids) = ids
    if prompt != other_prompt:  # mistral-common encodes turn by turn, so the prompt cannot depend on the answer
        raise RuntimeError("the prompt encodes differently before chosen and rejected (tokenizer changed?)")
    return prompt, chosen_ids, rejected_ids


def fit_pair(turns: list[dict], chosen: str, rejected: str, tokenizer, max_length: int, max_prompt_length: int):
    """(prompt, chosen, rejected) ids within max_length, and whether the prompt was shortened.

    TRL's rule decides when: prompt + the longer answer over max_length and prompt over max_prompt_length. Then the
    prompt loses its oldest exchanges first (a system turn stays), and if the last question alone is still too long,
    the start of its text, after `<s>[INST]`: cutting tokens off the front, as TRL does, would leave the model a
    prompt that starts inside an old answer, or one without `[INST]`. Answers are cut to what is left."""
    prompt, chosen_ids, rejected_ids = encode_pair(turns, chosen, rejected, tokenizer)
    longest = max(len(chosen_ids), len(rejected_ids))

    def too_long(ids: list[int]) -> bool:
        return len(ids) + longest > max_length and len(ids) > max_prompt_length

    shortened = False
    while too_long(prompt) and (fewer := _without_oldest_exchange(turns)) is not None:
        turns, shortened = fewer, True
        prompt = encode_pair(turns, chosen, rejected, tokenizer)[0]
    if too_long(prompt):
        head = _instruction_head(tokenizer)
        prompt, shortened = prompt[:head] + prompt[len(prompt) - (max_prompt_length - head) :], True
    room = max_length - len(prompt)
    return prompt, chosen_ids[:room], rejected_ids[:room], shortened


def _without_oldest_exchange(turns: list[dict]) -> list[dict] | None:
    """The prompt turns less their first user/assistant exchange (a leading system turn stays); None when only the
    last question is left. The turns alternate: encode_pair has validated them."""
    lead = 1 if formats.turn_role(turns[0]) == "system" else 0
    return turns[:lead] + turns[lead + 2 :] if len(turns) - lead >= 3 else None


def _instruction_head(tokenizer) -> int:
    """How many tokens open a one-question prompt before the question's text (`<s>[INST]`, in pieces in v1)."""
    a, b = (encode_pair([{"role": "user", "content": q}], "x", "y", tokenizer)[0] for q in ("a", "b"))
    return len(os.path.commonprefix([a, b]))


def _load_split(cfg: DataSection, split: str, tokenizer, max_length: int, max_prompt_length: int):
    dataset, label = read_rows(cfg, split)
    fmt = formats.preference_format(dataset.column_names, cfg.format, label)
    settings = {"method": "dpo", "format": fmt.name, "max_length": max_length, "max_prompt_length": max_prompt_length}
    rows, dropped, sums = encode_rows(
        dataset.select_columns(list(fmt.columns)),
        partial(_encode_row, fmt=fmt, tokenizer=tokenizer, max_length=max_length, max_prompt_length=max_prompt_length),
        {**dict.fromkeys(PAIR_COLUMNS, "ids"), "_supervised": "count", "_prompt_shortened": "count"},
        settings,
        tokenizer=tokenizer,
        num_proc=cfg.num_proc,
        label=label,
    )
    report = SourceReport(source=label, format=fmt.describe(), read=len(dataset), kept=len(rows))
    report.supervised_tokens, report.prompts_shortened = sums["_supervised"], sums["_prompt_shortened"]
    settle(report, dropped, cfg, label, not_bad=None, empty_fix="fix the data")
    return rows, report


def _encode_row(row: dict, *, fmt, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """One pair's ids, fitted to the lengths; ValueError(reason) drops it."""
    prompt, chosen, rejected, shortened = fit_pair(
        *split_pair(fmt.convert(row)), tokenizer, max_length, max_prompt_length
    )
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "_supervised": len(chosen) + len(rejected),
        "_prompt_shortened": int(shortened),
    }
