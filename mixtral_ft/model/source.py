"""Where a model comes from: `tiny`, a local folder, or a Hub id at a revision — decided once, then passed on.

`model_source()` checks the name without touching the network, so a bad `model.name` fails before data or
weights load; `local_path()` downloads (safetensors and tokenizer files only) when it must, and
`config_dict()` reads just config.json, which is all `plan` needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mixtral_ft.errors import UserError, io_failure
from mixtral_ft.model.shapes import tiny_config
from mixtral_ft.model.tiny import TINY_NAME, cached_tiny_dir, tiny_model_dir
from mixtral_ft.recipe import is_repo_id

HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model*", "tekken.json"]


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user wrote it: the name run.json, adapter configs and model cards record
    kind: str  # tiny | local | hub
    revision: str | None = None

    def local_path(self) -> Path:
        """The folder to load from; a hub id is downloaded once per source (training asks for the tokenizer
        and the weights: one snapshot_download)."""
        return self._path

    @cached_property
    def _path(self) -> Path:
        if self.kind == "tiny":
            return tiny_model_dir()
        if self.kind == "local":
            return Path(self.name).expanduser()
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id=self.name, revision=self.revision, allow_patterns=HUB_FILES))
        except Exception as exc:  # network, auth, missing repo: all the user's to fix
            if io_failure(exc):
                raise  # a full disk is not bad input: exit 74 (cli.py)
            raise UserError(fetch_problem(exc, self.name, self.revision)) from None

    def tokenizer_folder(self) -> Path | None:
        """Where `local_path()` would find the tokenizer, without building or downloading anything: tiny's cached
        folder, the local folder, or a Hub snapshot already in the cache. None: mistral-common's bundled Mixtral
        tokenizer, which tiny and Hub Mixtral folders also give (data/tokenizer.py), file for file."""
        if self.kind == "tiny":
            return cached_tiny_dir()
        if self.kind == "local":
            return self.local_path()
        from huggingface_hub import snapshot_download

        try:
            cached = snapshot_download(
                self.name, revision=self.revision, allow_patterns=HUB_FILES, local_files_only=True
            )
        except Exception:  # not in the cache (or no such revision there): the weights' download will say why
            return None
        return Path(cached)

    def config_dict(self) -> dict:
        """config.json alone (no weights); for a Hub id the cache or one request (hub_config.ConfigUnavailable)."""
        if self.kind == "tiny":
            return tiny_config().to_dict()
        if self.kind == "local":
            return read_config(self.local_path())
        from mixtral_ft.model.hub_config import fetch_config

        return fetch_config(self.name, self.revision)


def fetch_problem(exc: Exception, name: str, revision: str | None) -> str:
    """The one line for a failed model download: what the Hub answered, and the fix for it."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from mixtral_ft.model.hub_config import offline

    head = f"could not fetch model '{name}' from the Hub"
    if isinstance(exc, GatedRepoError):  # a RepositoryNotFoundError too: first
        return (
            f"{head}: it is gated; accept its terms at https://huggingface.co/{name} with your account, "
            "then `hf auth login` (or set HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{head}: it has no revision '{revision}'; fix model.revision"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{head}: no such repo, or a private one you cannot see; check model.name, or `hf auth login`"
    if offline():
        return f"{head}: HF_HUB_OFFLINE is set and it is not in the local cache; unset it to download the model"
    if isinstance(exc, LocalEntryNotFoundError):  # no answer from the Hub, and nothing cached
        return f"{head}: the Hub did not answer and it is not in the local cache; check your network (or HF_ENDPOINT)"
    return f"{head} ({type(exc).__name__}): check the id, your network, and HF_TOKEN / `hf auth login`"


def model_source(name: str | Path | ModelSource, revision: str | None = None) -> ModelSource:
    """The source `name` means, checked without the network; a UserError naming the fix otherwise."""
    if isinstance(name, ModelSource):
        return name
    name = str(name)
    if revision and (name == TINY_NAME or Path(name).expanduser().exists()):  # read as it is: no revision to pick
        raise UserError(f"model.revision applies to a Hub id, and '{name}' is not one: remove it")
    if name == TINY_NAME:
        return ModelSource(name, "tiny")
    path = Path(name).expanduser()
    if path.exists():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise UserError(
                f"'{path}' is a LoRA adapter folder, not a model: pass its base model "
                "(audit also takes the run's recipe.yaml)"
            )
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{path}' has no config.json: point model.name at a Mixtral checkpoint")
        read_config(path)  # a broken one is one line here, not a traceback from transformers or plan
        return ModelSource(name, "local")
    if not is_repo_id(name):  # './nope' or 'runs/x/y' is a missing folder, not a Hub id to try and fail to fetch
        raise UserError(f"model '{name}' is neither a local folder nor a hub id like mistralai/Mixtral-8x7B-v0.1")
    return ModelSource(name, "hub", revision)


def read_config(folder: Path) -> dict:
    """`folder`'s config.json, a JSON object with a model_type; a UserError naming the folder otherwise."""
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except ValueError as exc:  # truncated, edited by hand, not UTF-8
        raise UserError(
            f"model folder '{folder}': config.json is not valid JSON ({exc}): copy it back from the checkpoint"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(
            f"model folder '{folder}': config.json has no model_type: point model.name at a Mixtral checkpoint"
        )
    return config


def check_adapter_folder(adapter: str | Path, key: str = "model.adapter") -> Path:
    """`adapter` as a LoRA adapter folder (one with adapter_config.json); a UserError naming `key` otherwise."""
    read_adapter_config(adapter, key)
    return Path(adapter)


def read_adapter_config(adapter: str | Path, key: str = "model.adapter") -> dict:
    """The folder's adapter_config.json; a UserError naming `key` when it is missing or not JSON."""
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        raise UserError(
            f"{key} '{adapter}' is not an adapter folder (no adapter_config.json): pass a training output_dir"
        )
    try:
        return json.loads(config.read_bytes())
    except ValueError as exc:  # a truncated copy, an edit gone wrong
        raise UserError(
            f"{key} '{adapter}': adapter_config.json is not valid JSON ({exc}); copy it back from a checkpoint-N folder"
        ) from None


def resolve_model_path(name: str | Path | ModelSource, revision: str | None = None) -> Path:
    """`tiny`, a local folder, or a hub id (downloaded through huggingface_hub, safetensors only)."""
    return model_source(name, revision).local_path()
