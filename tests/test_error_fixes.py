"""Every fix a one-line error names exists: recipe keys, `mixtral-ft` commands and flags, repo files, shell commands.

The messages come from tests/error_messages.py (the package's source, read with ast). The keys come from the recipe's
dataclasses, the commands and flags from cli.py's (and bench's) real parsers, the `hf` commands from test_hub's
HF_COMMANDS (which it runs): a renamed key, flag or file fails here, with file:line, until the messages follow it.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from functools import cache

from tests.error_messages import HOLE, ROOT, messages, reached_by
from tests.export.test_hub import HF_COMMANDS

SECTIONS = ("model", "data", "lora", "train", "dpo", "logging", "hub")
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "yaml", "yml", "parquet", "bin", "pth", "txt", "csv", "md", "py"}
KEY = re.compile(rf"(?<![\w./\\-])(?:{'|'.join(SECTIONS)})(?:\.\w+|\[[^\]\s]*\])+")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
TICKED = re.compile(r"`([^`]*)`")
PATH = re.compile(r"(?<![\w./-])(?:recipes|accelerate_configs|benchmarks|requirements|docs|notebooks|tests)/[\w./-]*")
PIP = re.compile(r"pip install ([^`);:,]*?)(?= in | or | then |[`);:,]|$)")
# Other programs' command lines, whose flags are theirs: `docker --gpus all` in common.why_no_cuda.
OTHER_TOOL = re.compile(r"(?<![\w-])docker [^`);:,]*")
HF = re.compile(r"(?<![\w-])hf((?: [a-z][a-z-]*)+)")


# --- what exists --------------------------------------------------------------------------------------


@cache
def recipe_keys() -> set[str]:
    """Every dotted recipe key, from the dataclasses; a list of sections is `key[]` (data.mixture[].path)."""
    from mixtral_ft.recipe.sections import Recipe

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, hint = prefix + f.name, hints[f.name]
            yield key
            inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, key + ".")
            for item in inner:
                yield key + "[]"
                yield from walk(item, key + "[].")

    return set(walk(Recipe, ""))


@cache
def command_flags() -> dict[str, set[str]]:
    """command -> its --flags, from cli.py's parser (bench: its own parser, which owns every option after it)."""
    from mixtral_ft.bench.args import build_parser as bench_parser
    from mixtral_ft.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices)
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    flags["bench"] = {o for a in bench_parser()._actions for o in a.option_strings}
    return flags


def commands_of(rel: str, func) -> set[str]:
    """The commands a message from here is about: its cmd_ function, else every command reaching its module."""
    if rel == "mixtral_ft/commands.py" and func is not None and func.name.startswith("cmd_"):
        return {func.name.removeprefix("cmd_")}
    return reached_by().get(rel) or set(command_flags())


@cache
def pip_flags() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--help"], capture_output=True, text=True).stdout
    return set(FLAG.findall(out))


def known_package(name: str) -> bool:
    """In the lock, or named in the README (optional packages it documents: liger-kernel, flash-attn)."""
    lock = (ROOT / "requirements/lock.txt").read_text().lower()
    readme = (ROOT / "README.md").read_text().lower()
    word = re.compile(rf"(?<![\w-]){re.escape(name.lower())}(?![\w-])")
    return bool(re.search(rf"^{re.escape(name.lower())}==", lock, re.M) or word.search(readme))


# --- the checks ---------------------------------------------------------------------------------------


def bad_keys(text: str) -> list[str]:
    bad = []
    for key in KEY.findall(text):
        general = re.sub(r"\[[^\]]*\]", "[]", key)  # data.mixture[{i}].weight: data.mixture[].weight
        if HOLE in general or key.rsplit(".", 1)[-1] in FILE_SUFFIXES:  # a partial name, or a file (model.safetensors)
            continue
        if general not in recipe_keys():
            bad.append(key.replace(HOLE, "{...}"))
    return bad


def bad_commands(text: str, about: set[str]) -> list[str]:
    """`mixtral-ft CMD --flag` in backticks; elsewhere `CMD --flag`, or a bare --flag of one of the `about` commands."""
    flags, bad = command_flags(), []
    for ticked in TICKED.findall(text):
        words = ticked.split()
        if words[:1] == ["mixtral-ft"] and len(words) > 1 and not words[1].startswith(("-", HOLE)):
            if words[1] not in flags:
                bad.append(f"mixtral-ft {words[1]}")
            else:
                bad += [f"{words[1]} {f}" for f in FLAG.findall(ticked) if f not in flags[words[1]] | {"--help"}]
    rest = OTHER_TOOL.sub(" ", PIP.sub(" ", TICKED.sub(" ", text)))  # pip's flags are checked with its command
    for match in FLAG.finditer(rest):
        before = rest[: match.start()].split()
        named = {before[-1]} if before and before[-1] in flags else about
        if not any(match[0] in flags[c] for c in named) and match[0] != "--help":
            bad.append(f"{'/'.join(sorted(named)) if len(named) < 4 else 'any command'} {match[0]}")
    return bad


def bad_paths(text: str) -> list[str]:
    return [p for p in PATH.findall(text) if HOLE not in p and not (ROOT / p.rstrip(".")).exists()]


def bad_shell(text: str) -> list[str]:
    bad = ["huggingface-cli (gone in huggingface_hub 1.x: hf)"] if "huggingface-cli" in text else []
    for words in (m.split() for m in HF.findall(text)):
        if not any(tuple(words[: len(c)]) == tuple(c) for c in HF_COMMANDS):
            bad.append(f"hf {' '.join(words)} (not in tests/export/test_hub.py's HF_COMMANDS)")
    for args in PIP.findall(text):
        tokens = args.replace("'", " ").replace('"', " ").split()
        for i, token in enumerate(tokens):
            after = tokens[i - 1] if i else ""
            if token.startswith("-"):
                bad += [] if token in pip_flags() or token in ("-e", "-c", "-r") else [f"pip install {token}"]
            elif after in ("-c", "-r"):
                bad += [] if (ROOT / token).is_file() else [f"pip install {after} {token}"]
            elif after == "-e":
                extras = re.findall(r"\w+", token.partition("[")[2])
                pyproject = (ROOT / "pyproject.toml").read_text()
                bad += [f"pip install -e {token}" for e in extras if not re.search(rf"^{e} = \[", pyproject, re.M)]
            elif HOLE not in token and not known_package(re.split(r"[<>=!~\[]", token)[0]):
                bad.append(f"pip install {token}")
    return bad


def problems(check) -> list[str]:
    found = []
    for where, strings, rel, func in messages():
        for text, line in strings:
            bad = check(text, commands_of(rel, func)) if check is bad_commands else check(text)
            raised = "" if line == where else f" (raised at {where})"
            found += [f"{line}: {b}{raised}" for b in bad]
    return sorted(set(found))


def test_the_messages_are_found():
    """The reader sees every UserError (~180), the helpers' call sites (rules.py's _need) and imported constants."""
    found = messages()
    assert sum(w.startswith("mixtral_ft/recipe/rules.py:") for w, *_ in found) > 40
    assert len(found) > 300, len(found)
    strings = [t for _, ts, *_ in found for t, _ in ts]
    assert any("would never train" in t for t in strings)  # rules.LM_HEAD_BYPASSED, imported by model/load.py
    assert any("docker --gpus all" in t for t in strings)  # common.why_no_cuda's return, in plan/fit_check's message


def test_every_recipe_key_named_exists():
    bad = problems(bad_keys)
    assert not bad, "messages name recipe keys the schema lacks:\n" + "\n".join(bad)


def test_every_command_and_flag_named_exists():
    bad = problems(bad_commands)
    assert not bad, "messages name commands or flags the parsers lack:\n" + "\n".join(bad)


def test_every_repository_file_named_exists():
    bad = problems(bad_paths)
    assert not bad, "messages name files the repository lacks:\n" + "\n".join(bad)


def test_every_shell_command_named_exists():
    bad = problems(bad_shell)
    assert not bad, "messages name shell commands that would not work:\n" + "\n".join(bad)
