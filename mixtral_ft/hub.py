"""`mixtral-ft push`: upload an adapter or a merged model folder to the Hugging Face Hub, with a model card.

The card (README.md) is generated from what the folder holds: the run's recipe.yaml, its run.json
metrics and, for merged models, merge.json and verify.json. The token comes from HF_TOKEN or the login
cache, never from a recipe or the command line, and no secret value (the Hub token, WANDB_API_KEY)
is ever written into the folder: generated files are scrubbed, and a copied file that contains one
stops the push. `HF_ENDPOINT` picks the Hub (a mirror, or a local stand-in in tests).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from mixtral_ft.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
SKIP_NAMES = {"training_args.bin", "README.md"}  # trainer pickles stay local; the card is regenerated
HF_TOKEN_BYTES = re.compile(rb"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")  # real ones: hf_ and 34 letters/digits
BUILTIN_DATASETS = {"builtin:oasst_top1": "OpenAssistant/oasst_top1_2023-08-25"}  # what the sample is from


def secret_values() -> list[str]:
    values = [os.environ.get(name) for name in SECRET_ENV]
    try:
        from huggingface_hub import get_token

        values.append(get_token())  # the login cache's token, if that is what a push would use
    except Exception:  # a broken token file must not stop us from scrubbing the others
        pass
    return sorted({v.strip() for v in values if v and len(v.strip()) >= 8}, key=len, reverse=True)


def scrub(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, "***")
    return text


def write_scrubbed(path: Path, text: str) -> None:
    path.write_text(scrub(text), encoding="utf-8")


def folder_kind(folder: Path) -> str:
    """"adapter" (peft LoRA folder) or "model" (full safetensors checkpoint); anything else is a UserError."""
    if not folder.is_dir():
        raise UserError(f"'{folder}' does not exist or is not a folder: pass an adapter or model folder")
    if (folder / "adapter_config.json").is_file() and any(folder.glob("adapter_model.*")):
        return "adapter"
    if (folder / "config.json").is_file() and ((folder / "model.safetensors").is_file()
                                              or (folder / "model.safetensors.index.json").is_file()):
        return "model"
    raise UserError(f"'{folder}' is not an adapter or model folder (no adapter_config.json + adapter_model.*, "
                    "nor config.json + model.safetensors)")


def check_repo_id(repo_id: str | None) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        ok = bool(repo_id and REPO_ID.match(repo_id))
    except HFValidationError:
        ok = False
    if not ok:
        raise UserError(f"bad repo id '{repo_id}': use ORG/NAME with letters, digits, '-', '_' or '.', "
                        "e.g. my-org/mixtral-8x7b-sft")
    return repo_id


def upload_files(folder: Path) -> list[Path]:
    """Files to upload, relative to `folder`: no hidden files, no trainer checkpoints, no old card."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.is_symlink() or (len(rel.parts) == 1 and rel.name in SKIP_NAMES):
            continue
        if any(p.startswith(".") or p.startswith("checkpoint-") for p in rel.parts):
            continue
        files.append(rel)
    return files


def _read(folder: Path, name: str, loader):
    file = folder / name
    try:
        return loader(file.read_text(encoding="utf-8")) if file.is_file() else None
    except (ValueError, yaml.YAMLError):
        return None


def render_card(folder: Path, kind: str, title: str | None = None) -> str:
    """README.md for the Hub: YAML front matter, usage, and the recipe, metrics and verify report we have."""
    recipe = _read(folder, "recipe.yaml", yaml.safe_load) or {}
    run = _read(folder, "run.json", json.loads)
    merge = _read(folder, "merge.json", json.loads)
    verify = _read(folder, "verify.json", json.loads)
    base = (merge or {}).get("base") or (recipe.get("model") or {}).get("name")
    data_path = (recipe.get("data") or {}).get("path")
    dataset = BUILTIN_DATASETS.get(data_path, data_path)
    meta = {}
    # Hub metadata must name hub repos; local folders and the built-in tiny model are left out.
    if base and REPO_ID.match(base) and not Path(base).exists():
        meta["base_model"] = base
    if dataset and REPO_ID.match(dataset) and not Path(dataset).exists():
        meta["datasets"] = [dataset]
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["license"] = "apache-2.0"  # Mixtral-8x7B's license; mixtral-ft fine-tunes nothing else
    meta["pipeline_tag"] = "text-generation"
    method = (recipe.get("train") or {}).get("method") or (run or {}).get("method") or "sft"
    meta["tags"] = ["mixtral", "qlora", "mixtral-ft", str(method)] + (["lora"] if kind == "adapter" else ["merged"])
    name = title or folder.resolve().name  # the repo id when pushing
    what = "a LoRA adapter" if kind == "adapter" else "a merged model (LoRA folded into the base weights)"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"QLoRA fine-tune of `{base or 'Mixtral'}` trained with mixtral-ft: {what}.", "", "## Usage", ""]
    if kind == "adapter":
        # On the NF4 base it was trained against (adapter_config's base path is the training machine's).
        lines += ["```python", "from peft import PeftModel", "from mixtral_ft import load_model", "",
                  f'model = PeftModel.from_pretrained(load_model("{base or "BASE_MODEL"}"), "{name}")', "```", "",
                  "`mixtral-ft merge ADAPTER --out DIR` merges it into the NF4-dequantized weights it was trained "
                  "against; a plain `merge_and_unload()` onto the bf16 base gives a different model.", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    if merge:
        how = ("the NF4-dequantized base weights the adapter was trained against, so the merged model "
               "computes what adapter-on-NF4-base computed in training" if merge.get("base_weights") == "dequantized"
               else "the original base weights (not the NF4 weights the adapter was trained against)")
        lines += ["## Merge", "", f"Merged into {how}; written as {merge.get('dtype')}.", ""]
    if verify:
        lines += ["## Verification", "", f"{verify.get('samples')} samples ({verify.get('source')}), "
                  f"{verify.get('tokens')} tokens, {verify.get('compute_dtype')}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {verify[k]:.6g} |" for k in ("max_abs_logit_diff", "mean_abs_logit_diff", "mean_abs_logit",
                  "perplexity_adapter_on_base", "perplexity_merged") if isinstance(verify.get(k), (int, float))]
        lines += [""]
    if run:
        keys = ("method", "steps", "world_size", "device", "compute_dtype", "train_loss", "final_loss", "tokens",
                "tokens_per_s", "train_runtime_s", "peak_memory_gib")
        lines += ["## Training run", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {run[k]} |" for k in keys if run.get(k) is not None]
        versions = run.get("versions") or {}
        if versions:
            lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
        lines += [""]
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    return scrub("\n".join(lines))


def write_card(folder: Path, kind: str, title: str | None = None) -> None:
    (folder / "README.md").write_text(render_card(folder, kind, title), encoding="utf-8")


def _refuse_leaks(folder: Path, files: list[Path]) -> None:
    """Every file to upload, binary ones too (tfevents, .wandb, .log, safetensors metadata), by byte search for the
    environment's tokens and for Hugging Face token shapes; streamed, so a 10 GB shard costs a read, not memory."""
    secrets = [s.encode() for s in secret_values()]
    for rel in files:
        path = folder / rel
        if _holds_secret(path, secrets):
            raise UserError(f"'{path}' contains the value of HF_TOKEN or WANDB_API_KEY (or another hf_... token): "
                            "remove it before pushing")


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
            print(f"  {name:<{width}}  {_human(size):>10}{'  (model card, generated)' if name == 'README.md' else ''}")
        print(f"{len(sizes)} files, {_human(sum(s for _, s in sizes))}")
        return {"kind": kind, "files": [n for n, _ in sizes], "uploaded": False}

    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login` (then retry the push)")
    (folder / "README.md").write_text(card, encoding="utf-8")
    # Read HF_ENDPOINT now rather than at huggingface_hub's import, so a mirror set later still counts.
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   allow_patterns=["README.md", *map(str, files)],
                                   commit_message=f"mixtral-ft: upload {kind}")
    except Exception as exc:  # HTTP, auth, offline mode, network: report one line, never the token
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(scrub(f"push to '{repo_id}' failed ({type(exc).__name__}: {first}); check the repo id, "
                              "your token's write access and HF_HUB_OFFLINE")) from None
    print(f"pushed {kind} folder {folder} to {getattr(commit, 'repo_url', repo_id)} ({len(files) + 1} files; "
          f"visibility {visibility} applies when the repo is created)")
    return {"kind": kind, "files": ["README.md", *map(str, files)], "uploaded": True, "commit": str(commit)}


def push_after_training(out: Path, recipe) -> None:
    """The `hub.push: true` hook: the adapter is saved already, so a failure says how to retry."""
    try:
        push_folder(out, recipe.hub.repo_id, private=recipe.hub.private)
    except UserError as exc:
        raise UserError(f"{exc} (the adapter is saved in {out}: retry with "
                        f"`mixtral-ft push {out} --repo-id {recipe.hub.repo_id}`)") from None


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
