"""Conversation data for SFT: read a source, tokenize with Mixtral's chat format, mask assistant turns.

Sources are the bundled sample (`builtin:oasst_top1`), local .jsonl/.json/.parquet files, local dataset
folders (including `save_to_disk` ones) or hub dataset ids, in any format formats.py knows (messages,
ShareGPT, ChatML text, Alpaca, prompt-completion). Each row becomes `input_ids` plus `assistant_masks`
(1 on assistant content and its `</s>`; for prompt-completion rows only on the completion), which TRL's
SFTTrainer uses as-is without re-tokenizing.
Bad rows are dropped and counted per reason; too many of them stop the run with a `UserError`.
Reading sources (files.py) and holding out and mixing them (sources.py) are shared with preference data
(prefs.py).
"""

from __future__ import annotations

from functools import partial

from mixtral_ft.data import formats
from mixtral_ft.data.encode import encode_rows
from mixtral_ft.data.files import read_rows
from mixtral_ft.data.formats import ROLE_ALIASES
from mixtral_ft.data.sources import SFTData, SourceReport, load_sources, settle
from mixtral_ft.recipe import DataSection

TRUNCATED = "no assistant tokens within max_length"


# --- conversations ----------------------------------------------------------------------------------


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Alternating user/assistant turns that start on user and end on assistant; ValueError(reason) if impossible."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError("conversation is not a list of turns")
    if not messages:
        raise ValueError("empty conversation")
    turns = fold_system([_turn(message) for message in messages])
    if any(t["role"] == "system" for t in turns):
        raise ValueError("system turn after the start")
    if turns[0]["role"] != "user":
        raise ValueError(f"first turn is {turns[0]['role']}, not user")
    for prev, cur in zip(turns, turns[1:]):
        if prev["role"] == cur["role"]:
            raise ValueError(f"two {cur['role']} turns in a row")
    if turns[-1]["role"] == "user":
        turns.pop()  # a prompt without an answer teaches nothing
    if not turns:
        raise ValueError("no assistant turn")
    return turns


def _turn(message) -> dict:
    """One {role, content} turn (messages or ShareGPT keys), role mapped to user/assistant/system."""
    if not isinstance(message, dict):
        raise ValueError("turn is not a {role, content} object")
    # Arrow fills keys missing from some rows with None, so a ShareGPT row may also carry role=None.
    role = message.get("role") if message.get("role") is not None else message.get("from")
    content = message.get("content") if message.get("content") is not None else message.get("value")
    if not isinstance(role, str):
        raise ValueError("turn without a role")
    if role.strip().lower() not in ROLE_ALIASES:
        raise ValueError(f"unknown role '{role[:20]}'")
    role = ROLE_ALIASES[role.strip().lower()]
    if not isinstance(content, str):
        raise ValueError("non-string content")
    content = content.strip()
    if not content and role != "system":  # an empty system prompt is harmless: nothing to fold in
        raise ValueError(f"empty {role} turn")
    return {"role": role, "content": content}


def fold_system(turns: list[dict]) -> list[dict]:
    """Mixtral's template has no system role; mistral-common itself folds a system prompt into the first user turn."""
    if turns[0]["role"] != "system":
        return turns
    system, turns = turns[0]["content"], turns[1:]
    if turns and turns[0]["role"] == "user" and system:
        turns[0] = {"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}
    if not turns:
        raise ValueError("no assistant turn")
    return turns


def encode_conversation(messages: list[dict], tokenizer) -> dict:
    """Mistral-common's finetuning encoding of the normalized conversation, and a mask that is 1 on each
    assistant turn's content and its `</s>`. ValueError(reason) for conversations that cannot be encoded."""
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest

    mistral = _finetuning_tokenizer(tokenizer)
    messages = normalize_messages(messages)
    turns = [(UserMessage if m["role"] == "user" else AssistantMessage)(content=m["content"]) for m in messages]
    try:
        ids = mistral.encode_chat_completion(ChatCompletionRequest(messages=turns)).tokens
    except (MistralCommonException, ValueError) as exc:  # ValueError: pydantic's ValidationError
        raise ValueError(f"tokenizer rejected the conversation ({type(exc).__name__})") from None

    def prefix_length(n: int) -> int:
        if n == len(turns):
            return len(ids)
        # Straight to the instruct encoder: the finetuning validator refuses requests that end on a user turn.
        prefix = mistral.instruct_tokenizer.encode_instruct(InstructRequest(messages=turns[:n])).tokens
        if ids[: len(prefix)] != prefix:
            raise RuntimeError(
                f"the encoding of the first {n} turns is not a prefix of the whole conversation; "
                "refusing to guess the assistant mask (tokenizer changed?)"
            )
        return len(prefix)

    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = prefix_length(i), prefix_length(i + 1)
            mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "assistant_masks": mask}


def _finetuning_tokenizer(tokenizer):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mistral = tokenizer if isinstance(tokenizer, MistralTokenizer) else getattr(tokenizer, "tokenizer", None)
    if not isinstance(mistral, MistralTokenizer):
        raise TypeError("encode_conversation needs transformers' MistralCommonBackend (see mixtral_ft.data.tokenizer)")
    # TypeError, not ValueError: a wrong tokenizer is a bug, and must not be counted as a bad row.
    if mistral.mode != ValidationMode.finetuning:
        raise TypeError("load the tokenizer with mode='finetuning' to encode training conversations")
    return mistral


def load_sft_data(cfg: DataSection, tokenizer, *, max_length: int, seed: int, assistant_only: bool = True) -> SFTData:
    """Tokenized, masked train (and eval) datasets for the recipe's data section, with one report per split.

    `assistant_only` (train.assistant_only_loss) only decides what the reports count as supervised tokens."""
    _finetuning_tokenizer(tokenizer)
    return load_sources(
        cfg, lambda one, split: _load_split(one, split, tokenizer, max_length, assistant_only), seed=seed
    )


def _load_split(cfg: DataSection, split: str, tokenizer, max_length: int, assistant_only: bool):
    dataset, label = read_rows(cfg, split)
    fmt = formats.sft_format(dataset.column_names, dataset[0] if len(dataset) else None, cfg.format, label)
    settings = {"method": "sft", "format": fmt.name, "max_length": max_length, "assistant_only": assistant_only}
    rows, dropped, sums = encode_rows(
        dataset.select_columns(list(fmt.columns)),
        partial(_encode_row, fmt=fmt, tokenizer=tokenizer, max_length=max_length, assistant_only=assistant_only),
        {"input_ids": "ids", "assistant_masks": "mask", "_supervised": "count", "_trailing_user": "count"},
        settings,
        tokenizer=tokenizer,
        num_proc=cfg.num_proc,
        label=label,
    )
    report = SourceReport(source=label, format=fmt.describe(), read=len(dataset), kept=len(rows))
    report.supervised_tokens, report.trailing_user_dropped = sums["_supervised"], sums["_trailing_user"]
    settle(
        report,
        dropped,
        cfg,
        label,
        not_bad=TRUNCATED,
        empty_fix=f"fix the data, or raise train.max_length (now {max_length}) if rows are too long",
    )
    return rows, report


def _encode_row(row: dict, *, fmt, tokenizer, max_length: int, assistant_only: bool) -> dict:
    """One row's ids and mask, cut to max_length, and what it adds to the report; ValueError(reason) drops it."""
    messages, context_answers = fmt.convert(row)
    encoded = encode_conversation(messages, tokenizer)
    mask = formats.completion_only(encoded["assistant_masks"], context_answers)[:max_length]
    if 1 not in mask:
        raise ValueError(TRUNCATED)
    ids = encoded["input_ids"][:max_length]
    return {
        "input_ids": ids,
        "assistant_masks": mask,
        # Without the mask the loss is on every token but the first (<s>, which nothing predicts).
        "_supervised": sum(mask) if assistant_only else len(ids) - 1,
        "_trailing_user": int(formats.ends_on_user(messages)),
    }
