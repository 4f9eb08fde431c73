"""`mixtral-ft eval`: held-out loss and perplexity, base vs adapter, plus sample generations in eval.json.

The target is a training output folder (its recipe.yaml and adapter) or a recipe (its output_dir's
adapter when there is one, else `--adapter`, else the base alone); a merged folder (merge.json) is scored
itself, through the NF4 loader like chat. Rows come from the recipe's
held-out split exactly as training made it (`data.eval_split`, or `data.test_size` with the run's
seed, through `load_sft_data`), or from `--data FILE`, all of which is then held out. Loss counts the
assistant tokens only (`assistant_masks`), the tokens training puts its loss on. The base numbers come
from the same loaded model with the adapter switched off (`disable_adapter`), so one copy of the
weights serves both columns. Preference pairs (a DPO run's held-out data, or `--data` pairs) are scored instead
as pair_eval.py says: how often each variant prefers the chosen answer, and the adapter's DPO rewards.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from mixtral_ft.common import bar, say
from mixtral_ft.errors import UserError
from mixtral_ft.export.merge import refuse_merged_twice
from mixtral_ft.export.staging import refuse_unwritable
from mixtral_ft.model.scoring import assistant_nll
from mixtral_ft.model.source import check_adapter_folder
from mixtral_ft.use.chat import GenerationSettings, Target, generate, is_merged_folder, load_for_inference
from mixtral_ft.use.eval_report import write_report
from mixtral_ft.use.pair_eval import (
    REFERENCE,
    given_data,
    held_out_pairs,
    load_reference,
    pair_samples,
    score_pairs,
    scores_pairs,
    settle_pair_scores,
)


def resolve_eval_target(target: str, adapter: str | None):
    """(recipe, Target, default eval.json path) for an output folder or a recipe file."""
    path = Path(target).expanduser()
    recipe, out_dir = _target_recipe(path, target)
    if adapter is None and (out_dir / "adapter_config.json").is_file():
        adapter = str(out_dir)
    if adapter is not None:
        check_adapter_folder(adapter, "--adapter")
    base, experts, revision = _scored_weights(path, recipe, target, adapter)
    return (
        recipe,
        Target(
            base=base,
            adapter=Path(adapter) if adapter else None,
            quantize_experts=experts,
            compute_dtype=recipe.model.compute_dtype,
            revision=revision,
        ),
        out_dir / "eval.json",
    )


def _target_recipe(path: Path, target: str):
    """(recipe, output folder) of a training output folder or a recipe file."""
    from mixtral_ft.recipe import load_recipe

    if path.is_dir():
        if not (path / "recipe.yaml").is_file():
            raise UserError(f"'{target}' has no recipe.yaml: pass a training output_dir or a recipe file")
        return load_recipe(path / "recipe.yaml"), path
    if path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path)
        return recipe, Path(recipe.train.output_dir)
    raise UserError(f"'{target}' is neither a training output folder nor a .yaml recipe")


def _scored_weights(path: Path, recipe, target: str, adapter: str | None) -> tuple[str, bool, str | None]:
    """(base, quantize_experts, revision) to load: a merged folder's own weights, else the run's base."""
    m = recipe.model
    if not (path.is_dir() and is_merged_folder(str(path))):
        return m.name, m.quantize_experts, m.revision
    if adapter is not None:
        refuse_merged_twice(path, Path(adapter), target, adapter)
    return str(path), json.loads((path / "merge.json").read_text()).get("quantize_experts", True), None


def check_report_path(path: Path) -> None:
    """The report may replace an earlier report, never a folder or another file (a recipe, an adapter)."""
    if path.is_dir():
        raise UserError(f"--out '{path}' is a folder: pass a file path, e.g. {path / 'eval.json'}")
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"scores": {}}
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and "scores" in earlier):
        raise UserError(f"--out '{path}' exists and is not an eval report: choose a new file name")
    refuse_unwritable(path, "--out")  # else it would fail only after minutes of scoring


def held_out_rows(recipe, target: Target, data_path: str | None, max_rows: int | None):
    """(dataset with input_ids + assistant_masks, description) of the rows to evaluate on."""
    from mixtral_ft.data.conversations import load_sft_data
    from mixtral_ft.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(target.source.local_path(), mode="finetuning")
    cfg = recipe.data if data_path is None else given_data(recipe.data, data_path)
    data = load_sft_data(cfg, tokenizer, max_length=recipe.train.max_length, seed=recipe.train.seed)
    rows = data.train if data_path is not None else data.eval
    if rows is None:
        raise UserError(
            f"recipe data '{cfg.path}' has no held-out rows (data.eval_split and data.test_size "
            "are unset): pass --data FILE"
        )
    if max_rows is not None and len(rows) > max_rows:
        rows = rows.select(range(max_rows))
    what = data_path or f"{cfg.path} [{cfg.eval_split or f'test_size {cfg.test_size} of {cfg.split}'}]"
    return rows, what


@torch.no_grad()
def assistant_loss(model, rows, device: torch.device) -> tuple[float, int]:
    """Mean next-token NLL over assistant tokens, and how many tokens that is."""
    # One row per forward: no padding, so no attention-mask subtleties, and eval sets are small.
    nll, count = 0.0, 0
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]], device=device), use_cache=False).logits[0]
        row_nll, row_count = assistant_nll(logits, row["input_ids"], row["assistant_masks"])
        nll, count = nll + row_nll, count + row_count
    if count == 0:
        raise UserError("the held-out rows have no assistant tokens to score")
    return nll / count, count


def sample_prompts(rows, tokenizer, n: int) -> list[dict]:
    """The first user turn of each of the first `n` rows (ids up to the first assistant token) and its answer."""
    samples = []
    for row in rows.select(range(min(n, len(rows)))):
        ids, mask = row["input_ids"], row["assistant_masks"]
        start = mask.index(1)
        end = next((i for i in range(start, len(mask)) if not mask[i]), len(mask))
        samples.append(
            {
                "prompt_ids": ids[:start],
                "prompt": _user_text(tokenizer.decode(ids[:start], skip_special_tokens=True)),
                "reference": tokenizer.decode(ids[start:end], skip_special_tokens=True).strip(),
            }
        )
    return samples


def _user_text(prompt: str) -> str:
    # [INST] markers are plain text in Mixtral's v1 vocabulary, so decoding keeps them; the report doesn't.
    return prompt.strip().removeprefix("[INST]").removesuffix("[/INST]").strip()


def evaluate(
    target: str,
    *,
    adapter: str | None = None,
    data: str | None = None,
    samples: int = 3,
    out: str | None = None,
    max_rows: int | None = None,
    settings: GenerationSettings | None = None,
    attn_implementation: str | None = None,
) -> dict:
    """Score base (and adapter) on held-out rows, generate samples, write and return the report."""
    settings = (settings or GenerationSettings(max_new_tokens=128, temperature=0.0)).check()
    _check_counts(samples, max_rows)
    recipe, loaded_target, default_out = resolve_eval_target(target, adapter)
    out_path = Path(out) if out else default_out
    check_report_path(out_path)  # before the load and the scoring, not after them
    pairs = scores_pairs(recipe, data)
    if pairs:
        rows, what = held_out_pairs(recipe, loaded_target.source.local_path(), data, max_rows)
    else:
        rows, what = held_out_rows(recipe, loaded_target, data, max_rows)
    say("eval", f"{len(rows)} held-out {'pairs' if pairs else 'rows'} from {what}")
    merged = not eval_quantizes(loaded_target)
    how = "as merged, unquantized" if merged else "NF4"
    say("eval", f"loading {loaded_target.base}{' with the adapter' if loaded_target.adapter else ''} ({how})")
    model, tokenizer = load_for_inference(loaded_target, quantize=not merged, attn_implementation=attn_implementation)
    prompts = (pair_samples if pairs else sample_prompts)(rows, tokenizer, samples)
    plain = "merged" if merged else "base"  # a merged folder: itself
    reference = load_reference(model, recipe) if pairs and loaded_target.adapter else None
    scores, tokens = score_variants(
        model,
        tokenizer,
        rows,
        prompts,
        settings,
        with_adapter=bool(loaded_target.adapter),
        plain=plain,
        score=score_pairs if pairs else score_rows,
        reference=reference,
    )
    report = {
        "model": loaded_target.base,
        "weights": "unquantized" if merged else "nf4",
        "adapter_dir": str(loaded_target.adapter) if loaded_target.adapter else None,
        "data": what,
        "rows": len(rows),
        "answer_tokens" if pairs else "assistant_tokens": tokens,
        "scores": scores,
        "generation": dataclasses.asdict(settings),
        "samples": [{k: v for k, v in s.items() if k != "prompt_ids"} for s in prompts],
    }
    if pairs:
        report["rewards"] = settle_pair_scores(scores, recipe, plain)
    write_report(report, out_path)
    return report


def eval_quantizes(target: Target) -> bool:
    """Whether eval loads `target` in NF4. Not a merged folder: it is scored as it was written, since NF4 would
    quantize its merged weights again and round away much of what the adapter added (tiny run: two thirds of its
    loss change), under the name `merged`."""
    return not is_merged_folder(target.base)


def _check_counts(samples: int, max_rows: int | None) -> None:
    """`--samples` and `--max-rows`, refused before anything loads."""
    if samples < 0:
        raise UserError("--samples must be >= 0")
    if max_rows is not None and max_rows < 1:
        raise UserError("--max-rows must be >= 1")


def score_rows(model, rows, device: torch.device) -> tuple[dict, int]:
    """Loss and perplexity on conversation rows, and the assistant tokens scored."""
    loss, tokens = assistant_loss(model, rows, device)
    return {"loss": round(loss, 6), "perplexity": _perplexity(loss)}, tokens


def score_variants(
    model,
    tokenizer,
    rows,
    prompts: list[dict],
    settings,
    *,
    with_adapter: bool,
    plain: str = "base",
    score=score_rows,
    reference=None,
) -> tuple[dict, int]:
    """`score` of the model (`plain`: adapter switched off), then (`reference`: with a DPO run's starting adapter)
    with the adapter; each fills in its sample answers."""
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    variants = {plain: model.disable_adapter if with_adapter else nullcontext}
    if reference is not None:
        variants[REFERENCE] = reference
    if with_adapter:
        variants["adapter"] = nullcontext
    scores = {}
    for name, context in variants.items():
        with context():
            say("eval", f"{name}: scoring {len(rows)} {'rows' if score is score_rows else 'pairs'}")
            scores[name], tokens = score(model, bar(rows, f"eval {name}"), device)
            for i, sample in enumerate(prompts, 1):
                say("eval", f"{name}: generating sample {i}/{len(prompts)} (up to {settings.max_new_tokens} tokens)")
                sample[name] = generate(model, tokenizer, sample["prompt_ids"], settings)
    return scores, tokens


def _perplexity(loss: float) -> float:
    # A random base model's loss can be ~10 nats; exp overflows only past ~709, so inf is honest there.
    return round(math.exp(loss), 4) if loss < 700 else math.inf
