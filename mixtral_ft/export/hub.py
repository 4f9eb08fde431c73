"""`mixtral-ft push`: upload an adapter or a merged model folder to the Hugging Face Hub, with a model card.

The card (README.md) is generated from what the folder holds: the run's recipe.yaml, its run.json
metrics and, for merged models, merge.json and verify.json. The token comes from HF_TOKEN or the login
cache, never from a recipe or the command line, and no secret value (the Hub token, WANDB_API_KEY)
is ever written into the folder: generated files are scrubbed, and a copied file that contains one
stops the push. `HF_ENDPOINT` picks the Hub (a mirror, or a local stand-in in tests).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mixtral_ft.common import human_bytes
from mixtral_ft.errors import UserError
from mixtral_ft.train.card import render_card, scrub, secret_values

# Trainer pickles stay local (a checkpoint-N folder holds the optimizer's too); the card is regenerated.
SKIP_NAMES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "README.md"}
HF_TOKEN_BYTES = re.compile(rb"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")  # real ones: hf_ and 34 letters/digits


def folder_kind(folder: Path) -> str:
    """ "adapter" (peft LoRA folder) or "model" (full safetensors checkpoint); anything else is a UserError."""
    if not folder.is_dir():
        raise UserError(f"'{folder}' does not exist or is not a folder: pass an adapter or model folder")
    if (folder / "adapter_config.json").is_file() and any(folder.glob("adapter_model.*")):
        return "adapter"
    if (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    ):
        return "model"
    raise UserError(
        f"'{folder}' is not an adapter or model folder (no adapter_config.json + adapter_model.*, "
        "nor config.json + model.safetensors)"
    )


def check_repo_id(repo_id: str | None) -> str:
    from mixtral_ft.recipe import is_repo_id

    if not is_repo_id(repo_id):
        raise UserError(
            f"bad repo id '{repo_id}': use ORG/NAME with letters, digits, '-', '_' or '.', e.g. my-org/mixtral-8x7b-sft"
        )
    return repo_id


def upload_files(folder: Path) -> list[Path]:
    """Files to upload, relative to `folder`: no hidden files, no trainer checkpoints, no old card."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        pickle = rel.name in SKIP_NAMES or (rel.name.startswith("rng_state") and rel.suffix == ".pth")
        if not path.is_file() or path.is_symlink() or (len(rel.parts) == 1 and pickle):
            continue
        if any(p.startswith(".") or p.startswith("checkpoint-") for p in rel.parts):
            continue
        files.append(rel)
    return files


def _refuse_leaks(folder: Path, files: list[Path]) -> None:
    """Every file to upload, binary ones too (tfevents, .wandb, .log, safetensors metadata), by byte search for the
    environment's tokens and for Hugging Face token shapes; streamed, so a 10 GB shard costs a read, not memory."""
    secrets = [s.encode() for s in secret_values()]
    for rel in files:
        path = folder / rel
        if _holds_secret(path, secrets):
            raise UserError(
                f"'{path}' contains the value of HF_TOKEN or WANDB_API_KEY (or another hf_... token): "
                "remove it before pushing"
            )


def _holds_secret(path: Path, secrets: list[bytes]) -> bool:
    overlap = max([len(s) for s in secrets] + [64])
    tail = b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            window = tail + block
            if any(s in window for s in secrets) or HF_TOKEN_BYTES.search(window):
                return True
            tail = window[-overlap:]
    return False


def push_folder(folder: str | Path, repo_id: str | None, *, private: bool = True, dry_run: bool = False) -> dict:
    """Create `repo_id` if needed and upload the folder with a fresh card; `dry_run` only lists the files."""
    folder = Path(folder)
    kind = folder_kind(folder)
    check_repo_id(repo_id)
    files = upload_files(folder)
    _refuse_leaks(folder, files)
    card = render_card(folder, kind, repo_id)
    visibility = "private" if private else "public"
    if dry_run:
        sizes = [("README.md", len(card.encode()))] + [(str(f), (folder / f).stat().st_size) for f in files]
        print(f"dry run: would push {kind} folder {folder} to {repo_id} ({visibility}); nothing uploaded")
        width = max(len(name) for name, _ in sizes)
        for name, size in sizes:
            note = "  (model card, generated)" if name == "README.md" else ""
            print(f"  {name:<{width}}  {human_bytes(size, digits=1):>10}{note}")
        print(f"{len(sizes)} files, {human_bytes(sum(s for _, s in sizes), digits=1)}")
        return {"kind": kind, "files": [n for n, _ in sizes], "uploaded": False}

    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (then retry the push)")
    # The card goes up from memory: the folder's own README.md (training's card, the user's notes) stays as it is.
    operations = [CommitOperationAdd("README.md", card.encode("utf-8"))]
    operations += [CommitOperationAdd(f.as_posix(), str(folder / f)) for f in files]
    # Read HF_ENDPOINT now rather than at huggingface_hub's import, so a mirror set later still counts.
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(
            repo_id=repo_id, repo_type="model", operations=operations, commit_message=f"mixtral-ft: upload {kind}"
        )
    except Exception as exc:  # HTTP, auth, offline mode, network: report one line, never the token
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            scrub(
                f"push to '{repo_id}' failed ({type(exc).__name__}: {first}); check the repo id, "
                "your token's write access and HF_HUB_OFFLINE"
            )
        ) from None
    print(
        f"pushed {kind} folder {folder} to {getattr(commit, 'repo_url', repo_id)} ({len(files) + 1} files; "
        f"visibility {visibility} applies when the repo is created)"
    )
    return {"kind": kind, "files": ["README.md", *map(str, files)], "uploaded": True, "commit": str(commit)}


def push_after_training(out: Path, recipe) -> None:
    """The `hub.push: true` hook: the adapter is saved already, so a failure says how to retry."""
    try:
        push_folder(out, recipe.hub.repo_id, private=recipe.hub.private)
    except UserError as exc:
        raise UserError(
            f"{exc} (the adapter is saved in {out}: retry with `mixtral-ft push {out} --repo-id {recipe.hub.repo_id}`)"
        ) from None
