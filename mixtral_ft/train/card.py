"""The model card of a run or merged folder: YAML front matter, usage, and what the folder's files record.

Training writes it into its output folder and `push` uploads the same card (titled with the repo id), so a
folder reads the same on disk and on the Hub. Every card is scrubbed of the secrets in the environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mixtral_ft.recipe import is_repo_id
from mixtral_ft.recipe.schema import env_secrets

BUILTIN_DATASETS = {"builtin:oasst_top1": "OpenAssistant/oasst_top1_2023-08-25"}  # what the sample is from


def secret_values() -> list[str]:
    values = env_secrets()
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


def _read(folder: Path, name: str, loader):
    file = folder / name
    try:
        return loader(file.read_text(encoding="utf-8")) if file.is_file() else None
    except (ValueError, yaml.YAMLError):
        return None


def render_card(folder: Path, kind: str, title: str | None = None, ref: str | None = None) -> str:
    """README.md for the Hub: YAML front matter, usage, and the recipe, metrics and verify report we have.

    `title` is the repo id when pushing (else the folder's name); `ref`, what the usage code loads: the repo id, or
    for the card kept in a local folder that folder's path (its bare name loads only from its parent folder)."""
    recipe = _read(folder, "recipe.yaml", yaml.safe_load) or {}
    run = _read(folder, "run.json", json.loads)
    merge = _read(folder, "merge.json", json.loads)
    base = (merge or {}).get("base") or (recipe.get("model") or {}).get("name")
    name = title or folder.resolve().name  # the repo id when pushing
    what = "a LoRA adapter" if kind == "adapter" else "a merged model (LoRA folded into the base weights)"
    lines = [
        *_front_matter(recipe, run, kind, base),
        f"# {name}",
        "",
        f"QLoRA fine-tune of `{base or 'Mixtral'}` trained with mixtral-ft: {what}.",
        "",
        *_usage(kind, base, ref or name),
        *_merge_section(merge),
        *_verify_section(_read(folder, "verify.json", json.loads)),
        *_run_table(run),
        *_eval_section(folder, _read(folder, "eval.json", json.loads)),
        *_run_sections(folder, run),
    ]
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    return scrub("\n".join(lines))


def _front_matter(recipe: dict, run: dict | None, kind: str, base: str | None) -> list[str]:
    data = recipe.get("data") or {}
    paths = [data.get("path")] + [m.get("path") for m in data.get("mixture") or [] if isinstance(m, dict)]
    meta = {}
    # Hub metadata must name hub repos; local folders and the built-in tiny model are left out.
    if is_repo_id(base) and not Path(base).exists():
        meta["base_model"] = base
    datasets = [BUILTIN_DATASETS.get(p, p) for p in paths if p]  # data.path, or every data.mixture source
    datasets = [d for d in dict.fromkeys(datasets) if is_repo_id(d) and not Path(d).exists()]
    if datasets:
        meta["datasets"] = datasets
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["license"] = "apache-2.0"  # Mixtral-8x7B's license; mixtral-ft fine-tunes nothing else
    meta["pipeline_tag"] = "text-generation"
    method = (recipe.get("train") or {}).get("method") or (run or {}).get("method") or "sft"
    meta["tags"] = ["mixtral", "qlora", "mixtral-ft", str(method)] + (["lora"] if kind == "adapter" else ["merged"])
    return ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]


def _usage(kind: str, base: str | None, ref: str) -> list[str]:
    lines = ["## Usage", ""]
    if kind == "adapter":
        # On the NF4 base it was trained against (adapter_config's base path is the training machine's).
        return lines + [
            "```python",
            "from peft import PeftModel",
            "from mixtral_ft import load_model",
            "",
            f'model = PeftModel.from_pretrained(load_model("{base or "BASE_MODEL"}"), "{ref}")',
            "```",
            "",
            "`mixtral-ft merge ADAPTER --out DIR` merges it into the NF4-dequantized weights it was trained "
            "against; a plain `merge_and_unload()` onto the bf16 base gives a different model.",
            "",
        ]
    return lines + [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{ref}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{ref}")',
        "```",
        "",
    ]


def _merge_section(merge: dict | None) -> list[str]:
    if not merge:
        return []
    how = (
        "the NF4-dequantized base weights the adapter was trained against, so the merged model "
        "computes what adapter-on-NF4-base computed in training"
        if merge.get("base_weights") == "dequantized"
        else "the original base weights (not the NF4 weights the adapter was trained against)"
    )
    return ["## Merge", "", f"Merged into {how}; written as {merge.get('dtype')}.", ""]


VERIFY_METRICS = (
    "max_abs_logit_diff",
    "mean_abs_logit_diff",
    "mean_abs_logit",
    "tolerance",
    "perplexity_adapter_on_base",
    "perplexity_merged",
    "adapted_weights",
    "adapted_weight_error_ratio",
)


def _verify_section(verify: dict | None) -> list[str]:
    if not verify:
        return []
    lines = [
        "## Verification",
        "",
        f"Merged model against the {verify.get('reference', 'adapter on its base')}: "
        f"{verify.get('samples')} samples ({verify.get('source')}), "
        f"{verify.get('tokens')} tokens, {verify.get('compute_dtype')}:",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {verify[k]:.6g} |" for k in VERIFY_METRICS if isinstance(verify.get(k), (int, float))]
    if verify.get("verdict"):
        lines += [
            "",
            f"Verdict: **{verify['verdict']}** (mean |Δlogit| against the tolerance for "
            f"{verify.get('weights_dtype')} weights, and each adapted weight against its dtype's rounding).",
        ]
    return lines + [""]


RUN_METRICS = (
    "method",
    "steps",
    "resumed_at_step",
    "world_size",
    "device",
    "compute_dtype",
    "train_loss",
    "final_loss",
    "reward_accuracy",  # DPO only: the last logged reward accuracy and margin (dpo.py)
    "reward_margin",
    "tokens",
    "tokens_per_s",
    "train_runtime_s",
    "eval_and_save_s",
    "peak_memory_gib",
)


# What a multi-process run's figures cover, said in the table: the bare names read as one GPU's.
ALL_RANKS = {
    "tokens": "tokens (all {n} processes)",
    "tokens_per_s": "tokens_per_s (all {n} processes, not per GPU)",
    "peak_memory_gib": "peak_memory_gib (per process, the highest of {n})",
}


def _run_table(run: dict | None) -> list[str]:
    if not run:
        return []
    n = run.get("world_size") or 1
    label = {k: v.format(n=n) for k, v in ALL_RANKS.items()} if n > 1 else {}
    lines = ["## Training run", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label.get(k, k)} | {run[k]} |" for k in RUN_METRICS if run.get(k) is not None]
    lines += _memory_row(run.get("memory"))
    versions = run.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return lines + [""]


def _memory_row(memory: dict | None) -> list[str]:
    """The load peak, loaded footprint and training peak (train/memory.py), as one row of the run table."""
    if not memory:
        return []
    labels = {"load_peak_gib": "load peak", "model_gib": "loaded model", "train_peak_gib": "training peak"}
    value = ", ".join(f"{label} {memory[k]} GiB" for k, label in labels.items() if memory.get(k) is not None)
    return [f"| memory ({memory.get('device')}, rank {memory.get('rank')}) | {value} |"]


def _eval_section(folder: Path, report: dict | None) -> list[str]:
    """`mixtral-ft eval`'s scores, when its eval.json scored this very folder (`--adapter` may have scored another)."""
    if not report or not isinstance(report.get("scores"), dict):
        return []
    scored = report.get("adapter_dir") or report.get("model")
    if not scored or Path(scored).resolve() != folder.resolve():
        return []
    pairs = "answer_tokens" in report
    keys = ("prefers_chosen", "logp_margin") if pairs else ("loss", "perplexity")
    lines = ["## Evaluation", "", f"`mixtral-ft eval` on {report['rows']} held-out {'pairs' if pairs else 'rows'} "]
    lines[-1] += f"({report.get('data')}, {report.get('weights', 'nf4')} weights):"
    lines += ["", f"| | {' | '.join(k.replace('_', ' ') for k in keys)} |", "|---|---|---|"]
    lines += [f"| {name} | {' | '.join(str(s.get(k)) for k in keys)} |" for name, s in report["scores"].items()]
    rewards = report.get("rewards")
    if rewards:
        lines += ["", f"DPO rewards against {rewards['reference']} (beta {rewards['beta']}): accuracy "]
        lines[-1] += f"{rewards['accuracy']:.2f}, margin {rewards['margin']}."
    return lines + [""]


def _run_sections(folder: Path, run: dict | None) -> list[str]:
    """Eval loss, data report, audit summary and plots, from the files training wrote next to the adapter."""
    lines = []
    evals = (run or {}).get("eval_losses") or []
    if evals:
        lines += [
            f"Eval loss at step {evals[-1]['step']}: {evals[-1]['eval_loss']:.4g} ({len(evals)} evaluations).",
            "",
        ]
    data = _read(folder, "data_report.json", json.loads)
    if data:
        lines += ["## Data", ""] + [f"- {row['line'].removeprefix('data: ')}" for row in data] + [""]
    audit = _read(folder, "audit.json", json.loads)
    if audit:
        lines += ["## Audit", "", "| group | dtype | params | trainable |", "|---|---|---|---|"]
        lines += [
            f"| {r['group']} | {'/'.join(r['dtypes'])} | {r['params']:,} | {r['trainable']:,} |"
            for r in audit.get("rows", [])
            if r.get("tensors")
        ]
        lines += ["", "audit: ok" if audit.get("ok") else f"audit FAILED: {'; '.join(audit.get('failures', []))}", ""]
    plots = [name for name in ("loss_curve.png", "router_heatmap.png") if (folder / name).is_file()]
    if plots:
        lines += ["## Plots", ""] + [f"![{name.removesuffix('.png')}]({name})" for name in plots] + [""]
    return lines


def write_card(folder: Path, kind: str, title: str | None = None, ref: str | None = None) -> None:
    (folder / "README.md").write_text(render_card(folder, kind, title, ref), encoding="utf-8")
