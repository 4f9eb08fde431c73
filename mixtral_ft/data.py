"""Conversation data for SFT: read a source, tokenize with Mixtral's chat format, mask assistant turns.

Sources are the bundled sample (`builtin:oasst_top1`), local .jsonl/.json/.parquet files, local dataset
folders or hub dataset ids. Rows hold either ChatML text (a `text` column, as in
OpenAssistant/oasst_top1_2023-08-25) or lists of turns (`messages`/`conversation`/`conversations`, with
{role, content} or ShareGPT {from, value} turns). Each row becomes `input_ids` plus `assistant_masks`
(1 on assistant content and its `</s>`), which TRL's SFTTrainer uses as-is without re-tokenizing.
Bad rows are dropped and counted per reason; too many of them stop the run with a `UserError`.
`data.mixture` blends several sources by weight (`load_sources`, shared with preference data in prefs.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection

if TYPE_CHECKING:
    from datasets import Dataset

BUILTIN = {"oasst_top1": str(Path(__file__).parent / "sample_data" / "oasst_top1.jsonl"),
           "preferences": str(Path(__file__).parent / "sample_data" / "preferences.jsonl")}
LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MESSAGE_COLUMNS = ("messages", "conversation", "conversations")
ROLE_ALIASES = {"user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "system": "system"}
TRUNCATED = "no assistant tokens within max_length"


@dataclass
class SourceReport:
    source: str  # e.g. "builtin:oasst_top1 [train]"
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    sampled: str | None = None  # mixtures: the source's share of the mixed train set

    def line(self) -> str:
        total = sum(self.dropped.values())
        text = f"data: {self.source}: read {self.read}, kept {self.kept}, dropped {total}"
        if total:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in _by_count(self.dropped)) + ")"
        if self.sampled:
            text += f"; mixture: {self.sampled}"
        return text


@dataclass
class SFTData:
    train: Dataset  # columns input_ids, assistant_masks
    eval: Dataset | None
    reports: list[SourceReport]


# --- conversations ----------------------------------------------------------------------------------

def parse_chatml(text: str) -> list[dict]:
    """`<|im_start|>role\\ncontent<|im_end|>` blocks -> [{"role", "content"}]; ValueError(reason) if malformed."""
    if not isinstance(text, str):
        raise ValueError("text is not a string")
    head, *chunks = text.split("<|im_start|>")
    if not chunks:
        raise ValueError("no ChatML turns (<|im_start|>role ... <|im_end|>)")
    if head.strip():
        raise ValueError("text before the first ChatML turn")
    messages = []
    for chunk in chunks:
        body, closed, tail = chunk.partition("<|im_end|>")
        if not closed:
            raise ValueError("ChatML turn without <|im_end|>")
        if tail.strip():
            raise ValueError("text between ChatML turns")
        role, newline, content = body.partition("\n")
        if not newline or not role.strip().isidentifier():
            raise ValueError("ChatML turn without a role line")
        messages.append({"role": role.strip(), "content": content})
    return messages


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Alternating user/assistant turns that start on user and end on assistant; ValueError(reason) if impossible."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError("conversation is not a list of turns")
    if not messages:
        raise ValueError("empty conversation")
    turns = []
    for message in messages:
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
        turns.append({"role": role, "content": content})

    # Mixtral's template has no system role; mistral-common itself folds a system prompt this way.
    if turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
        if turns and turns[0]["role"] == "user" and system:
            turns[0] = {"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}
        if not turns:
            raise ValueError("no assistant turn")
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
            raise RuntimeError(f"the encoding of the first {n} turns is not a prefix of the whole conversation; "
                               "refusing to guess the assistant mask (tokenizer changed?)")
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
        raise TypeError("encode_conversation needs transformers' MistralCommonBackend (see mixtral_ft.tokenizer)")
    # TypeError, not ValueError: a wrong tokenizer is a bug, and must not be counted as a bad row.
    if mistral.mode != ValidationMode.finetuning:
        raise TypeError("load the tokenizer with mode='finetuning' to encode training conversations")
    return mistral


# --- sources ----------------------------------------------------------------------------------------

def load_sft_data(cfg: DataSection, tokenizer, *, max_length: int, seed: int) -> SFTData:
    """Tokenized, masked train (and eval) datasets for the recipe's data section, with one report per split."""
    _finetuning_tokenizer(tokenizer)
    return load_sources(cfg, lambda one, split: _load_split(one, split, tokenizer, max_length), seed=seed)


def load_sources(cfg: DataSection, load_split, *, seed: int) -> SFTData:
    """Train and eval rows of `data.path` or of each `data.mixture` source, mixed by weight.

    `load_split(cfg_of_one_source, split)` returns (Dataset, SourceReport). Each source's eval rows come from
    its eval split, or are held out (data.test_size) before sampling, so no eval row is ever trained on.
    """
    if cfg.path is not None or not cfg.mixture:  # recipes can't set both; a replace(cfg, path=FILE) means FILE
        return SFTData(*_train_and_eval(cfg, load_split, seed))
    parts = []
    for source in cfg.mixture:
        one = dataclasses.replace(cfg, path=source.path, split=source.split, eval_split=source.eval_split,
                                  format=source.format or cfg.format, max_rows=source.max_rows or cfg.max_rows,
                                  mixture=(), mixture_size=None)
        parts.append(_train_and_eval(one, load_split, seed))
    return mix(parts, [s.weight for s in cfg.mixture], cfg.mixture_size, seed)


def _train_and_eval(cfg: DataSection, load_split, seed: int):
    train, report = load_split(cfg, cfg.split)
    reports = [report]
    eval_set = None
    if cfg.eval_split:
        eval_set, eval_report = load_split(cfg, cfg.eval_split)
        reports.append(eval_report)
    elif cfg.test_size > 0:
        try:
            parts = train.train_test_split(test_size=cfg.test_size, seed=seed)
        except ValueError as exc:
            raise UserError(f"data: cannot hold out data.test_size={cfg.test_size} of {len(train)} rows of "
                            f"{cfg.path} ({exc}); use more data or set data.test_size: 0") from None
        train, eval_set = parts["train"], parts["test"]
    return train, eval_set, reports


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Rows per source: weight/sum(weights) of `total`, rounded so that they add up to `total` exactly."""
    shares = [w / sum(weights) * total for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(parts: list[tuple], weights: list[float], size: int | None, seed: int) -> SFTData:
    """One train set from (train, eval, reports) per source. The total is `size` (data.mixture_size) or the
    sum of the sources' train rows; a source asked for more rows than it has is repeated whole, then sampled."""
    import numpy as np
    from datasets import concatenate_datasets

    rng = np.random.default_rng(seed)
    total = size or sum(len(train) for train, _, _ in parts)
    chosen = []
    for (train, _, reports), weight, n in zip(parts, weights, mixture_counts(weights, total)):
        repeats, rest = divmod(n, len(train))
        indices = np.concatenate([np.tile(np.arange(len(train)), repeats),
                                  rng.choice(len(train), rest, replace=False)]).astype(int)
        chosen.append(train.select(indices))
        reports[0].sampled = f"weight {weight / sum(weights):.2f}, {n} of {total} rows ({n / len(train):.2f}x)"
    mixed = concatenate_datasets(chosen)
    mixed = mixed.select(rng.permutation(len(mixed)))  # interleave the sources, reproducibly
    evals = [eval_set for _, eval_set, _ in parts if eval_set is not None]
    reports = [report for _, _, source_reports in parts for report in source_reports]
    return SFTData(train=mixed, eval=concatenate_datasets(evals) if evals else None, reports=reports)


def read_rows(cfg: DataSection, split: str):
    """The raw rows of one source's split (at most data.max_rows) and its label for messages."""
    dataset = _read_source(cfg.path, split)
    label = f"{cfg.path} [{split}]"
    if cfg.max_rows is not None and len(dataset) > cfg.max_rows:
        dataset = dataset.select(range(cfg.max_rows))
    if len(dataset) == 0:
        raise UserError(f"data: {label} has no rows; check data.path and data.split")
    return dataset, label


def settle(report: SourceReport, dropped: Counter, cfg: DataSection, label: str, *, not_bad: str | None,
           empty_fix: str) -> None:
    """Record the drops; stop the run when too many rows are bad or none is left. Rows dropped for `not_bad`
    (a length setting, not bad data) don't count towards data.max_bad_fraction."""
    report.dropped = dict(_by_count(dropped))
    bad = report.read - report.kept - dropped[not_bad]
    reasons = ", ".join(f"{r}: {n}" for r, n in _by_count(dropped))
    if bad / report.read > cfg.max_bad_fraction:
        raise UserError(f"data: {100 * bad / report.read:.0f}% of rows in {label} are unparseable "
                        f"(top reasons: {reasons}); fix the data or raise data.max_bad_fraction "
                        f"(now {cfg.max_bad_fraction})")
    if report.kept == 0:
        raise UserError(f"data: no usable rows in {label} ({reasons}); {empty_fix}")


def _load_split(cfg: DataSection, split: str, tokenizer, max_length: int):
    from datasets import Dataset

    dataset, label = read_rows(cfg, split)
    column, parse = _pick_column(dataset.column_names, cfg.format, label)

    report = SourceReport(source=label)
    dropped: Counter[str] = Counter()
    rows: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    for value in dataset[column]:
        report.read += 1
        try:
            encoded = encode_conversation(parse(value), tokenizer)
        except ValueError as exc:
            dropped[str(exc)] += 1
            continue
        ids, mask = encoded["input_ids"][:max_length], encoded["assistant_masks"][:max_length]
        if 1 not in mask:
            dropped[TRUNCATED] += 1
            continue
        rows["input_ids"].append(ids)
        rows["assistant_masks"].append(mask)
    report.kept = len(rows["input_ids"])
    settle(report, dropped, cfg, label, not_bad=TRUNCATED,
           empty_fix=f"fix the data, or raise train.max_length (now {max_length}) if rows are too long")
    return Dataset.from_dict(rows), report


def _read_source(path: str, split: str):
    """The named split of a source as a datasets.Dataset, with every failure turned into a UserError."""
    import datasets

    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise UserError(f"data: unknown built-in dataset '{name}'; use one of {[f'builtin:{n}' for n in BUILTIN]}")
        return _read_file(Path(BUILTIN[name]), path, split)
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if suffix in LOCAL_LOADERS:
        if not local.is_file():
            raise UserError(f"data: file '{path}' not found; fix data.path (relative paths are from the "
                            "current directory) or use builtin:oasst_top1 for the bundled sample")
        return _read_file(local, path, split)
    if local.is_file():
        raise UserError(f"data: '{path}' has an unsupported extension '{suffix}'; "
                        "use .jsonl, .json or .parquet")
    if local.is_dir():
        where = f"local dataset folder '{path}'"
        fix = "check the folder holds data files (.jsonl/.json/.parquet/.csv) and the split exists"
    elif path.startswith((".", "/", "~")):
        raise UserError(f"data: '{path}' not found; fix data.path")
    else:
        where = f"hub dataset '{path}'"
        fix = ("check the id and split, your network, and `huggingface-cli login` for gated datasets; "
               "or pass a local .jsonl/.json/.parquet file")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as exc:  # datasets/hub raise many unrelated types; each means "cannot load this"
        raise UserError(f"data: cannot load {where} (split '{split}'): {_why(exc)}; {fix}") from None


def _read_file(file: Path, label: str, split: str):
    import datasets

    if split != "train":
        raise UserError(f"data: {label} is a single file with only a 'train' split, not '{split}'; "
                        "set data.split: train, and data.test_size (not data.eval_split) for eval")
    loader = LOCAL_LOADERS[file.suffix.lower()]
    if loader == "json":
        _check_json_text(file, label)
    try:
        return datasets.load_dataset(loader, data_files=str(file), split="train")
    except Exception as exc:  # malformed JSON and broken Parquet arrive as assorted wrapped errors
        kind = "JSON Lines (or one JSON list of objects)" if loader == "json" else "Parquet"
        raise UserError(f"data: cannot read '{label}' as {kind}: {_why(exc)}; fix the file") from None


def _check_json_text(file: Path, label: str) -> None:
    # pyarrow accepts invalid UTF-8 and fails later, mid-iteration, and its JSON errors name no line:
    # one streaming pass here gives the user a line number instead.
    json_list = None
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"data: line {number} of '{label}' is not UTF-8 text; "
                                "re-save the file as UTF-8") from None
            if json_list is None and line:
                json_list = line.startswith("[")  # one JSON list of rows: left to datasets' parser
            if line and not json_list:
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"data: line {number} of '{label}' is not valid JSON ({exc.msg}); "
                                    "each line of a .jsonl file must be one JSON object") from None
    if json_list is None:
        raise UserError(f"data: '{label}' has no rows; check data.path")


def _pick_column(columns: list[str], fmt: str, label: str):
    message_column = next((c for c in MESSAGE_COLUMNS if c in columns), None)
    if fmt in ("auto", "messages") and message_column:
        return message_column, lambda value: value
    if fmt in ("auto", "chatml") and "text" in columns:
        return "text", parse_chatml
    expected = {"auto": ["text", *MESSAGE_COLUMNS], "chatml": ["text"], "messages": list(MESSAGE_COLUMNS)}[fmt]
    raise UserError(f"data: {label} has columns {columns}, none of {expected} (data.format: {fmt}); "
                    "rename the conversation column or set data.format")


def _why(exc: BaseException) -> str:
    from datasets.exceptions import DatasetGenerationError

    # The generic "error while generating the dataset" wraps the useful message (e.g. pyarrow's).
    while isinstance(exc, DatasetGenerationError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else 'no details'}"


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
