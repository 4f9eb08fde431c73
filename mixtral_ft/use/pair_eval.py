"""`mixtral-ft eval` on preference pairs (a DPO run's held-out ones, or `--data` pairs), scored as TRL's DPO
evaluation scores them.

A pair's score under a model is the summed log-probability of each answer's tokens (and its `</s>`) after the
prompt, as TRL's sigmoid loss sums them. Each variant (base, adapter) reports how often it prefers the chosen
answer and its mean log-prob margin. The adapter's DPO implicit rewards, beta x (log-prob under the adapter -
log-prob under the reference), are TRL's `rewards/*` against training's reference: the base for a fresh
adapter; for a run that continued one (`model.adapter`, e.g. SFT -> DPO), that starting adapter, loaded beside
the trained one and scored as the variant `reference`. They are means over pairs; TRL's eval logs the mean of
its batch means, which is the same number only when every eval batch is full (tiny run, 5 pairs in batches of
2: margin -0.0546 logged, -0.0439 over the pairs).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch

from mixtral_ft.common import say
from mixtral_ft.errors import UserError
from mixtral_ft.model.scoring import assistant_nll

REFERENCE = "reference"  # the variant, and peft adapter name, of a continued run's starting adapter


def given_data(cfg, data_path: str):
    """The data section for `--data`: the whole of its train split is held out, nothing split off."""
    return dataclasses.replace(cfg, path=data_path, split="train", eval_split=None, test_size=0.0, max_rows=None)


def scores_pairs(recipe, data_path: str | None) -> bool:
    """Whether eval scores preference pairs: a DPO run's own held-out data, or `--data` rows that are pairs (any
    run: how its adapter moved the preferences); else conversations, for loss."""
    from mixtral_ft.data.files import read_rows

    if data_path is None:
        return recipe.train.method == "dpo"
    dataset, _ = read_rows(given_data(recipe.data, data_path), "train")  # datasets caches it for the load
    return {"chosen", "rejected"} <= set(dataset.column_names)


def held_out_pairs(recipe, model_dir, data_path: str | None, max_rows: int | None):
    """(dataset of prompt/chosen/rejected ids, description) of the run's held-out pairs, as training made them,
    or of all the pairs in `data_path`."""
    from mixtral_ft.data.prefs import load_preference_data
    from mixtral_ft.data.tokenizer import load_tokenizer

    cfg, t = recipe.data, recipe.train
    if data_path is not None:
        cfg = dataclasses.replace(given_data(cfg, data_path), format="auto")  # an SFT recipe's format is not theirs
    tokenizer = load_tokenizer(model_dir, mode="finetuning")
    data = load_preference_data(
        cfg, tokenizer, max_length=t.max_length, max_prompt_length=recipe.dpo.max_prompt_length, seed=t.seed
    )
    rows = data.train if data_path is not None else data.eval
    if rows is None:
        raise UserError(
            f"recipe data '{cfg.path}' has no held-out pairs (data.eval_split and data.test_size are unset): "
            "pass --data FILE (preference pairs, or conversations to score loss)"
        )
    rows = rows.select(range(max_rows)) if max_rows is not None and len(rows) > max_rows else rows
    return rows, data_path or f"{cfg.path} [{cfg.eval_split or f'test_size {cfg.test_size} of {cfg.split}'}]"


@torch.no_grad()
def pair_logps(model, rows, device: torch.device) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) of each pair, summed over the answer tokens."""
    logps = []
    for row in rows:
        prompt, pair = row["prompt_ids"], []
        for answer in (row["chosen_ids"], row["rejected_ids"]):
            ids = prompt + answer
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
            pair.append(-assistant_nll(logits, ids, [0] * len(prompt) + [1] * len(answer))[0])
        logps.append((pair[0], pair[1]))
    return logps


def score_pairs(model, rows, device: torch.device) -> tuple[dict, int]:
    """One variant's preference scores (with its per-pair log-probs under `logps`) and the answer tokens scored."""
    logps = pair_logps(model, rows, device)
    if not logps:
        raise UserError("there are no held-out pairs to score")
    margins = [c - r for c, r in logps]
    tokens = sum(len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in rows)
    scores = {"prefers_chosen": _mean([m > 0 for m in margins]), "logp_margin": round(_mean(margins), 6)}
    return {**scores, "logps": logps}, tokens


def implicit_rewards(policy: list, reference: list, beta: float) -> dict:
    """TRL's DPO reward metrics of `policy` against `reference` (per-pair (chosen, rejected) log-probs)."""
    chosen = [beta * (p[0] - r[0]) for p, r in zip(policy, reference)]
    rejected = [beta * (p[1] - r[1]) for p, r in zip(policy, reference)]
    return {
        "beta": beta,
        "accuracy": _mean([c > r for c, r in zip(chosen, rejected)]),
        "margin": round(_mean([c - r for c, r in zip(chosen, rejected)]), 6),
        "chosen": round(_mean(chosen), 6),
        "rejected": round(_mean(rejected), 6),
    }


def load_reference(model, recipe):
    """A context that scores with the adapter a continued run started from (training's DPO reference), loaded
    beside the trained one; None for a fresh adapter (its reference is the base) or a starting adapter not found."""
    start = recipe.model.adapter
    if not start:
        return None
    if not (Path(start) / "adapter_config.json").is_file():  # a relative path from another working directory
        say("eval", f"note: model.adapter {start} (training's DPO reference) is not here: rewards are against the base")
        return None
    model.load_adapter(start, adapter_name=REFERENCE)

    @contextmanager
    def active():
        trained = model.active_adapter
        model.set_adapter(REFERENCE)
        try:
            yield
        finally:
            model.set_adapter(trained)

    return active


def settle_pair_scores(scores: dict, recipe, plain: str) -> dict | None:
    """Drop the per-pair log-probs from `scores`; the adapter's rewards against training's reference (the
    `reference` variant, else `plain`) when the adapter was scored."""
    logps = {name: score.pop("logps") for name, score in scores.items()}
    if "adapter" not in logps:
        return None
    against = REFERENCE if REFERENCE in logps else plain
    rewards = {**implicit_rewards(logps["adapter"], logps[against], recipe.dpo.beta), "reference": against}
    if recipe.model.adapter and against != REFERENCE:
        rewards["note"] = f"training's reference was model.adapter {recipe.model.adapter}, not found here"
    return rewards


def pair_samples(rows, tokenizer, n: int) -> list[dict]:
    """The prompt of each of the first `n` pairs, with its chosen and rejected answers."""

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    return [
        {
            "prompt_ids": row["prompt_ids"],
            "prompt": text(row["prompt_ids"]).removeprefix("[INST]").removesuffix("[/INST]").strip(),
            "chosen": text(row["chosen_ids"]),  # not "reference": that is a variant's name here
            "rejected": text(row["rejected_ids"]),
        }
        for row in rows.select(range(min(n, len(rows))))
    ]


def render_pair_scores(report: dict) -> list[str]:
    """The score table of a pairs report (samples are rendered as for conversations)."""
    scores = report["scores"]
    width = max(8, *map(len, scores))
    lines = [
        f"eval: {report['rows']} pairs, {report['answer_tokens']} answer tokens ({report['data']})",
        f"{'':{width}} {'prefers chosen':>15} {'log-prob margin':>16}",
    ]
    lines += [f"{n:{width}} {s['prefers_chosen']:>15.0%} {s['logp_margin']:>+16.4f}" for n, s in scores.items()]
    if rewards := report.get("rewards"):
        lines.append(
            f"DPO rewards of the adapter against {rewards['reference']} (beta {rewards['beta']}): accuracy "
            f"{rewards['accuracy']:.0%}, margin {rewards['margin']:+.4f} (chosen {rewards['chosen']:+.4f}, "
            f"rejected {rewards['rejected']:+.4f})"
        )
        if "note" in rewards:
            lines.append(f"note: {rewards['note']}")
    return lines


def _mean(values: list) -> float:
    return sum(values) / len(values)
