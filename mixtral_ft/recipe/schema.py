"""Strict YAML -> frozen dataclasses: every mistake is a one-line `UserError` naming the dotted key.

Generic machinery behind sections.py: read a YAML mapping, apply `dotted.key=value` overrides (values
parsed as YAML), reject secret-looking keys anywhere in the tree, and build nested dataclasses from their
type hints (unknown keys with a suggestion, wrong types, missing required values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import safeyaml

SECRET_KEYS = {
    "token",
    "hf_token",
    "hub_token",
    "access_token",
    "auth_token",
    "api_key",
    "apikey",
    "wandb_api_key",
    "password",
    "passwd",
    "secret",
    "secret_key",
}

WANDB = "a wandb API key"
TOKEN_PATTERNS = (
    (re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}"), "a Hugging Face token (hf_...)"),
    (re.compile(r"(?<![A-Za-z0-9])(?:sk|sk-proj|sk-ant)-[A-Za-z0-9_-]{20,}"), "an API key (sk-...)"),
    (re.compile(r"^(?:local-)?[0-9a-f]{40}$"), WANDB),
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe '{path}' is a folder: pass a YAML recipe file, e.g. recipes/tiny.yaml")
    if not path.is_file() and "=" in path.name:
        raise UserError(
            f"recipe file '{path}' not found; a KEY=VALUE override goes after the recipe "
            "(train, plan, audit) or after --set (validate)"
        )
    if not path.is_file():
        raise UserError(f"recipe file '{path}' not found: pass the path of a YAML recipe, e.g. recipes/tiny.yaml")
    try:
        raw = safeyaml.load(path.read_text(encoding="utf-8"))
    except safeyaml.YamlBound as exc:
        raise UserError(f"recipe '{path}' {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"recipe '{path}' is not valid YAML{line}: fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe '{path}' must be a mapping of sections (model, data, lora, train)")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{item}' is not key=value: write it like lora.r=8")
    try:
        value = safeyaml.load(text) if text.strip() else None
    except safeyaml.YamlBound as exc:
        raise UserError(f"override '{key.strip()}': the value {exc}") from None
    except yaml.YAMLError:
        raise UserError(f"override '{item}': the value is not valid YAML; quote it") from None
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parts[: i + 1])
            raise UserError(f"override '{item}': '{section}' is not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping of keys, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise UserError(f"unknown key '{prefix}{key}'{_suggest(str(key), fields, prefix)}")
    values = {}
    for name, f in fields.items():
        dotted = prefix + name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in raw or (raw[name] is None and required):
            if required:
                raise UserError(f"missing required key '{dotted}': add it to the recipe")
            if dataclasses.is_dataclass(hints[name]):
                values[name] = build_dataclass(hints[name], {}, dotted + ".")
            continue
        values[name] = _coerce(hints[name], raw[name], dotted)
    return cls(**values)


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, dotted + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_optional(args, value, dotted)
    if origin is tuple:
        return _coerce_list(args[0], value, dotted)
    scalar = SCALARS.get(hint)
    if scalar is None:
        raise TypeError(f"unsupported recipe type {hint} for {dotted}")
    return scalar(value, dotted)


def _coerce_optional(args: tuple, value: Any, dotted: str) -> Any:
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    if bool in inner and isinstance(value, bool):  # train.resume: true/false or a string
        return value
    return _coerce(inner[0], value, dotted)


def _coerce_list(item: Any, value: Any, dotted: str) -> tuple:
    if dataclasses.is_dataclass(item):  # data.mixture: a list of mappings
        if not isinstance(value, list):
            raise UserError(
                f"'{dotted}' must be a list of mappings, got {_kind(value)}: "
                "e.g. [{path: builtin:oasst_top1, weight: 1}]"
            )
        return tuple(build_dataclass(item, v, f"{dotted}[{i}].") for i, v in enumerate(value))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"'{dotted}' must be a list of strings, got {_kind(value)}: e.g. [q_proj, v_proj]")
    return tuple(value)


def _bool(value: Any, dotted: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"'{dotted}' must be true or false, got {_kind(value)}")
    return value


def _int(value: Any, dotted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"'{dotted}' must be an integer, got {_kind(value)}")
    if abs(value) >= 2**63:  # torch, numpy and islice take 64-bit integers: past them, a traceback mid-run
        raise UserError(f"'{dotted}' must be an integer below 2**63 in size, got {value:.3g}")
    return value


def _float(value: Any, dotted: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string; accept it as a number
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"'{dotted}' must be a number, got {_kind(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float's range
        value = float("inf")
    if not math.isfinite(value):  # .inf / .nan pass YAML and fail deep inside torch or the scheduler
        raise UserError(f"'{dotted}' must be a finite number, got {value}")
    return value


def _str(value: Any, dotted: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"'{dotted}' must be a non-empty string, got {_kind(value)}")
    return value


SCALARS = {bool: _bool, int: _int, float: _float, str: _str}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) < 40 else "a string"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _suggest(key: str, fields: dict, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    aliases = {
        "rank": "r",
        "lr": "learning_rate",
        "batch_size": "per_device_train_batch_size",
        "lora_alpha": "alpha",
        "lora_dropout": "dropout",
        "steps": "max_steps",
        "max_seq_length": "max_length",
        "output": "output_dir",
        "dataset": "path",
    }
    guess = aliases.get(key) if aliases.get(key) in fields else (close[0] if close else None)
    if guess:
        return f" (did you mean '{prefix}{guess}'?)"
    return f": valid keys here are {', '.join(fields)}"


def reject_secrets(raw: Any, prefix: str) -> None:
    """Secret-named keys, and token-shaped values under any key: recipes are copied into every run and checkpoint,
    and run names reach tensorboard and wandb files, so a token in one would spread everywhere."""
    if isinstance(raw, list):
        for i, item in enumerate(raw):
            reject_secrets(item, f"{prefix.rstrip('.')}[{i}].")
        return
    if isinstance(raw, str):
        what = token_kind(raw, prefix.rstrip("."))
        if what:
            raise UserError(
                f"'{prefix.rstrip('.')}' holds what looks like {what}: recipes are saved with every "
                "run, so never put tokens in them; set HF_TOKEN / WANDB_API_KEY in the environment"
            )
        return
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if str(key).lower() in SECRET_KEYS:
            _secret_error(dotted)
        reject_secrets(value, dotted + ".")


SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")  # where the tokens we know live


def env_secrets() -> list[str]:
    """The token values set in SECRET_ENV (8 characters or more: shorter ones would match by chance)."""
    return [s for s in (os.environ.get(name, "").strip() for name in SECRET_ENV) if len(s) >= 8]


def token_kind(value: str, dotted: str = "") -> str | None:
    """What kind of token `value` looks like (None: none). A 40-hex model.revision is a commit, not a wandb key."""
    for pattern, what in TOKEN_PATTERNS:
        if pattern.search(value) and not (what == WANDB and dotted.endswith("revision")):
            return what
    if any(s in value for s in env_secrets()):
        return "the value of HF_TOKEN or WANDB_API_KEY"
    return None


def _secret_error(dotted: str) -> None:
    raise UserError(
        f"'{dotted}' looks like a secret: recipes are saved with every run, so never put tokens in them; "
        "set HF_TOKEN / WANDB_API_KEY in the environment or run `hf auth login`"
    )


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
