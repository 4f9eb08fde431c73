"""Dataset formats: detect which public layout a source uses, and turn its rows into what our encoders take.

SFT rows become a list of {role, content} turns (conversations.encode_conversation) plus how many of its leading
assistant turns are context, not targets (prompt-completion trains on the completion only, as TRL's
`completion_only_loss`). Preference rows become {prompt, chosen, rejected} (prefs.split_pair).

| format              | columns                                          |
|---------------------|--------------------------------------------------|
| `messages`          | `messages` / `conversation` / `conversations` of {role, content} |
| `sharegpt`          | `conversations` (or `messages`) of {from, value} |
| `chatml`            | `text` holding `<|im_start|>role ... <|im_end|>` |
| `alpaca`            | `instruction`, `output`, optional `input`, `system` |
| `prompt_completion` | `prompt`, `completion`: strings or lists of turns |
| `preference`        | `prompt`, `chosen`, `rejected` (DPO)             |
| `implicit_prompt`   | `chosen`, `rejected` whole dialogues, no `prompt` (HH-RLHF text or lists; DPO) |
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import PREFERENCE_FORMATS, SFT_FORMATS

ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "system": "system",
}

MESSAGE_COLUMNS = ("messages", "conversation", "conversations")
NEEDS = {  # what each format reads, for error messages and the README
    "messages": "a messages/conversation/conversations column of {role, content} turns",
    "sharegpt": "a conversations column of {from, value} turns",
    "chatml": "a text column of <|im_start|>role ... <|im_end|> turns",
    "alpaca": "instruction and output columns (input optional)",
    "prompt_completion": "prompt and completion columns (strings or lists of turns)",
    "preference": "prompt, chosen and rejected columns",
    "implicit_prompt": "chosen and rejected columns holding whole dialogues (no prompt column)",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


@dataclass(frozen=True)
class Format:
    name: str  # one of SFT_FORMATS / PREFERENCE_FORMATS
    columns: tuple[str, ...]  # the columns convert() reads
    convert: Callable[[dict], object]  # one row (those columns) -> the encoder's input; ValueError(reason)
    detected: bool  # chosen by data.format: auto

    def describe(self) -> str:
        return f"{self.name}{' (auto-detected)' if self.detected else ''}"


# --- SFT -------------------------------------------------------------------------------------------


def sft_format(columns: list[str], first_row: dict | None, fmt: str, label: str) -> Format:
    """The SFT format of a source: data.format, or (auto) the first layout whose columns are present.

    chatml comes last: tatsu-lab/alpaca carries a `text` column (its rendered prompt) beside instruction/output."""
    message_column = next((c for c in MESSAGE_COLUMNS if c in columns), None)
    candidates = {
        "messages": message_column and ((message_column,), _as_messages),
        "sharegpt": message_column and ((message_column,), _as_messages),
        "alpaca": {"instruction", "output"} <= set(columns)
        and (tuple(c for c in ("system", "instruction", "input", "output") if c in columns), alpaca_messages),
        "prompt_completion": {"prompt", "completion"} <= set(columns)
        and (("prompt", "completion"), prompt_completion_messages),
        "chatml": "text" in columns and (("text",), _as_chatml),
    }
    if fmt == "auto":
        for name, found in candidates.items():
            if found:
                if name == "messages" and _is_sharegpt(first_row, message_column):
                    name = "sharegpt"
                return Format(name, *found, detected=True)
    elif candidates.get(fmt):
        return Format(fmt, *candidates[fmt], detected=False)
    raise unrecognised(label, columns, fmt, SFT_FORMATS)


def _is_sharegpt(row: dict | None, column: str) -> bool:
    turns = (row or {}).get(column)
    first = turns[0] if isinstance(turns, list) and turns else None
    return isinstance(first, dict) and first.get("from") is not None


def _as_messages(row: dict) -> tuple[list, int]:
    return next(iter(row.values())), 0  # role/content and from/value turns are both read by normalize_messages


def _as_chatml(row: dict) -> tuple[list, int]:
    return parse_chatml(row["text"]), 0


def alpaca_messages(row: dict) -> tuple[list[dict], int]:
    """Alpaca's instruction, with its input joined after a blank line (as TRL's and Alpaca's own templates
    place the input right after the instruction), as the user turn; output as the answer."""
    instruction, extra = row.get("instruction"), row.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("empty instruction")
    if extra is not None and not isinstance(extra, str):
        raise ValueError("input is not a string")
    user = f"{instruction.strip()}\n\n{extra.strip()}" if extra and extra.strip() else instruction.strip()
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": row.get("output")}]
    system = row.get("system")
    return ([{"role": "system", "content": system}] if isinstance(system, str) else []) + turns, 0


def prompt_completion_messages(row: dict) -> tuple[list[dict], int]:
    """TRL's prompt-completion layout as turns, and the number of answers inside the prompt (not trained on)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("prompt and completion mix a string and a list of turns")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], 0
    if not isinstance(prompt, list) or not isinstance(completion, list) or not completion:
        raise ValueError("prompt or completion is not a string or a list of turns")
    context = sum(1 for turn in prompt if turn_role(turn) == "assistant")
    if turn_role(prompt[-1] if prompt else None) != "user":
        raise ValueError("prompt does not end on a user turn")
    return [*prompt, *completion], context


def completion_only(mask: list[int], context_answers: int) -> list[int]:
    """The assistant mask without its first `context_answers` runs: the answers that are part of the prompt."""
    mask, run, inside = list(mask), 0, False
    for i, bit in enumerate(mask):
        if bit and not inside:
            run += 1
        inside = bool(bit)
        if bit and run <= context_answers:
            mask[i] = 0
    return mask


def ends_on_user(messages) -> bool:
    """True if a conversation ends on a user turn (normalize_messages drops it: a prompt without an answer)."""
    return isinstance(messages, list) and bool(messages) and turn_role(messages[-1]) == "user"


def turn_role(turn) -> str | None:
    """user / assistant / system for a messages or ShareGPT turn (role or `from`); None if it has none we know."""
    if not isinstance(turn, dict):
        return None
    role = turn.get("role") if turn.get("role") is not None else turn.get("from")
    return ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None


# --- preferences -------------------------------------------------------------------------------------


def preference_format(columns: list[str], fmt: str, label: str) -> Format:
    """`preference` (a prompt column) or `implicit_prompt` (the prompt is the dialogues' shared start)."""
    has_pair = {"chosen", "rejected"} <= set(columns)
    name = fmt if fmt != "auto" else ("preference" if "prompt" in columns else "implicit_prompt")
    if has_pair and name == "preference" and "prompt" in columns:
        return Format(name, ("prompt", "chosen", "rejected"), dict, detected=fmt == "auto")
    if has_pair and name == "implicit_prompt":
        return Format(name, ("chosen", "rejected"), implicit_prompt, detected=fmt == "auto")
    raise unrecognised(label, columns, fmt, PREFERENCE_FORMATS)


def implicit_prompt(row: dict) -> dict:
    """HH-RLHF style pair -> TRL's conversational {prompt, chosen, rejected}: the turns both dialogues share are
    the prompt (trl.extract_prompt), and what follows must be one answer each."""
    from trl import extract_prompt

    chosen, rejected = (_dialogue(row.get(name), name) for name in ("chosen", "rejected"))
    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not split["prompt"]:
        raise ValueError("chosen and rejected share no prompt")
    for name in ("chosen", "rejected"):
        if len(split[name]) != 1:
            raise ValueError("chosen and rejected differ before their last turn")
    return split


def _dialogue(value, name: str) -> list[dict]:
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string or a list of turns")
    return parse_hh(value, name)


def parse_hh(text: str, name: str = "text") -> list[dict]:
    """Anthropic HH-RLHF text (`\\n\\nHuman: … \\n\\nAssistant: …`) -> [{role, content}]."""
    head, *parts = HH_TURN.split(text)
    if not parts or head.strip():
        raise ValueError(f"{name} is not a '\\n\\nHuman: … \\n\\nAssistant: …' dialogue; add a prompt column")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[::2], parts[1::2])]


# --- errors ------------------------------------------------------------------------------------------


def sft_like(columns: list[str]) -> bool:
    names = set(columns)
    return (
        bool(names & {*MESSAGE_COLUMNS, "text"})
        or {"instruction", "output"} <= names
        or {"prompt", "completion"} <= names
    )


def unrecognised(label: str, columns: list[str], fmt: str, known: tuple[str, ...]):
    if fmt != "auto":
        return UserError(
            f"data: {label} has columns {columns}, but data.format: {fmt} needs {NEEDS[fmt]}; set "
            f"data.format to auto or to the format the file is in ({', '.join(known)})"
        )
    if known == SFT_FORMATS and {"chosen", "rejected"} <= set(columns):
        return UserError(
            f"data: {label} has columns {columns}: preference pairs, not conversations; "
            "set train.method: dpo to train on them (see recipes/tiny_dpo.yaml)"
        )
    if known == PREFERENCE_FORMATS and {"chosen", "rejected"} - set(columns) and sft_like(columns):
        return UserError(
            f"data: {label} has columns {columns}: conversations, not preference pairs (DPO needs "
            f"{NEEDS['preference']}, or {NEEDS['implicit_prompt']}); train on them with "
            "train.method: sft, or point data.path at preference data"
        )
    formats = "; ".join(f"{name}: {NEEDS[name]}" for name in known)
    return UserError(
        f"data: {label} has columns {columns}, which match no format we know ({formats}); rename "
        "the columns to one of these layouts (data.format: auto then finds it, or name it in data.format)"
    )


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
