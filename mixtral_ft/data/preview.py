"""What `mixtral-ft data` shows: the rows a recipe trains on, summarized, and a few rendered as the model sees them.

The rows come from data/rows.py, the functions `train` calls, so what is shown is what trains. A shown row is its
ids decoded with the real tokenizer (`<s>`, `</s>` kept, `[INST]` as the model reads it), the tokens the loss is on
marked: green on a terminal, `⟦…⟧` otherwise (brackets chosen because chat data, e.g. French text, uses «…»). A
word's leading space shows before the mark: sentencepiece puts it in the word's first token, which is trained.
"""

from __future__ import annotations

import math
from itertools import groupby

MARK = ("⟦", "⟧")
GREEN = ("\x1b[32m", "\x1b[0m")
BATCH = 10_000  # rows read from Arrow at a time, so a large set is summarized in bounded memory


def trained_mask(row: dict) -> list[int]:
    """1 where the SFT loss is: the assistant mask, or (train.assistant_only_loss false, no mask column) every
    token but `<s>`, which nothing predicts: TRL's labels in both cases."""
    if "assistant_masks" in row:
        return list(row["assistant_masks"])
    return [0] + [1] * (len(row["input_ids"]) - 1)


# --- summary ------------------------------------------------------------------------------------------


def spread(values: list[int]) -> dict:
    """min / median / p95 / max, by nearest rank (the ceil(q·n)-th smallest), so each is a real row's value."""
    ordered = sorted(values) or [0]
    at = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"min": ordered[0], "median": at(0.5), "p95": at(0.95), "max": ordered[-1]}


def _batches(dataset):
    if dataset is None:
        return
    for start in range(0, len(dataset), BATCH):
        yield dataset[start : start + BATCH]


def sft_stats(dataset, max_length: int, eos: int) -> dict:
    """Rows, tokens per row, rows at max_length (and those cut inside an answer: their last token is trained but is
    not `</s>`), tokens and supervised tokens of one split."""
    lengths, supervised, mid_answer = [], 0, 0
    for batch in _batches(dataset):
        for values in zip(*batch.values()):
            row = dict(zip(batch, values))
            mask, ids = trained_mask(row), row["input_ids"]
            lengths.append(len(ids))
            supervised += sum(mask)
            mid_answer += len(ids) == max_length and mask[-1] == 1 and ids[-1] != eos
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "tokens_per_row": spread(lengths),
        "at_max_length": sum(n == max_length for n in lengths),
        "cut_mid_answer": mid_answer,
        "supervised_tokens": supervised,
    }


def dpo_stats(dataset, max_length: int, eos: int) -> dict:
    """Pairs, prompt and answer lengths, pairs cut to max_length (an answer lost its end: every answer ends on
    `</s>` unless cut), answer tokens of one split."""
    prompts, chosen, rejected, cut = [], [], [], 0
    for batch in _batches(dataset):
        for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]):
            prompts.append(len(p))
            chosen.append(len(c))
            rejected.append(len(r))
            cut += c[-1:] != [eos] or r[-1:] != [eos]
    return {
        "pairs": len(prompts),
        "prompt_tokens": spread(prompts),
        "chosen_tokens": spread(chosen),
        "rejected_tokens": spread(rejected),
        "cut": cut,
        "supervised_tokens": sum(chosen) + sum(rejected),
    }


def summarize(data, method: str, max_length: int, eos: int) -> dict:
    stats = sft_stats if method == "sft" else dpo_stats
    return {
        "method": method,
        "max_length": max_length,
        "train": stats(data.train, max_length, eos),
        "eval": stats(data.eval, max_length, eos) if data.eval is not None else None,
    }


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


def _spread_text(s: dict) -> str:
    return f"min {s['min']}, median {s['median']}, p95 {s['p95']}, max {s['max']}"


def summary_lines(summary: dict) -> list[str]:
    train, held, n = summary["train"], summary["eval"], summary["max_length"]
    unit = "rows" if summary["method"] == "sft" else "pairs"
    count = train[unit]
    lines = [
        f"summary ({summary['method']}, train.max_length {n}):",
        f"  {unit}: {count:,} train, {held[unit] if held else 0:,} eval",
    ]
    if unit == "rows":
        at, trained, total = train["at_max_length"], train["supervised_tokens"], train["tokens"]
        cut = f"; {train['cut_mid_answer']:,} of them cut inside an answer (the rest is not trained)" if at else ""
        lines += [
            f"  tokens per train row: {_spread_text(train['tokens_per_row'])}",
            f"  at max_length: {at:,} of {count:,} train rows ({_share(at, count)}){cut}",
            f"  supervised tokens: {trained:,} of {total:,} train tokens ({_share(trained, total)})",
        ]
    else:
        lines += [
            f"  {part} tokens: {_spread_text(train[part + '_tokens'])}" for part in ("prompt", "chosen", "rejected")
        ]
        lines += [
            f"  cut to max_length: {train['cut']:,} of {count:,} train pairs ({_share(train['cut'], count)}) lost the "
            "end of an answer (no closing </s>)",
            f"  supervised tokens: {train['supervised_tokens']:,} train answer tokens (chosen + rejected)",
        ]
    if held:
        lines[-1] += f"; {held['supervised_tokens']:,} in eval"
    return lines


# --- rendering ----------------------------------------------------------------------------------------


def decode(ids: list[int], tokenizer) -> str:
    """The text of `ids` as the model reads it: special tokens by name, each text run with its leading space
    (sentencepiece's decode drops the first token's; the model sees it)."""
    special = set(tokenizer.all_special_ids)
    parts = []
    for is_special, run in groupby(ids, key=special.__contains__):
        run = list(run)
        if is_special:
            parts.append("".join(tokenizer.convert_ids_to_tokens(run)))
        else:
            space = " " if tokenizer.convert_ids_to_tokens(run[0]).startswith("▁") else ""
            parts.append(space + tokenizer.decode(run, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return "".join(parts)


def render(ids: list[int], mask: list[int], tokenizer, *, color: bool) -> str:
    """`ids` decoded, each run of trained tokens marked (green, or ⟦…⟧ in plain text)."""
    start, end = GREEN if color else MARK
    out = []
    for trained, run in groupby(zip(ids, mask), key=lambda pair: bool(pair[1])):
        text = decode([i for i, _ in run], tokenizer)
        if trained:
            body = text.removeprefix(" ")
            text = text[: len(text) - len(body)] + start + body + end
        out.append(text)
    return "".join(out)


def show_rows(data, method: str, tokenizer, n: int, *, color: bool) -> list[str]:
    """The first `n` train rows (already shuffled or mixed by the seed where the pipeline does that), rendered."""
    rows = data.train[: max(n, 0)]
    rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    how = "green" if color else "⟦…⟧"
    lines = []
    for i, row in enumerate(rows, 1):
        if method == "sft":
            mask = trained_mask(row)
            ids = row["input_ids"]
            lines += [f"--- train row {i} of {len(data.train):,}: {len(ids)} ids, {sum(mask)} trained ({how})"]
            lines += [render(ids, mask, tokenizer, color=color)]
        else:
            lengths = ", ".join(f"{part} {len(row[f'{part}_ids'])} ids" for part in ("prompt", "chosen", "rejected"))
            lines += [f"--- train pair {i} of {len(data.train):,}: {lengths} (answers {how}: what DPO compares)"]
            lines += [f"prompt:   {decode(row['prompt_ids'], tokenizer)}"]
            for part in ("chosen", "rejected"):
                ids = row[f"{part}_ids"]
                lines += [f"{part + ':':9} " + render(ids, [1] * len(ids), tokenizer, color=color).lstrip(" ")]
    return lines


def shown_json(data, method: str, tokenizer, n: int) -> list[dict]:
    """The first `n` train rows' ids (and the SFT loss mask), with their plain-text rendering."""
    rows = data.train[: max(n, 0)]
    rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    if method == "sft":
        return [
            {
                "input_ids": r["input_ids"],
                "trained_mask": (m := trained_mask(r)),
                "text": render(r["input_ids"], m, tokenizer, color=False),
            }
            for r in rows
        ]
    return [
        {**{f"{p}_ids": r[f"{p}_ids"] for p in ("prompt", "chosen", "rejected")}}
        | {f"{p}_text": decode(r[f"{p}_ids"], tokenizer) for p in ("prompt", "chosen", "rejected")}
        for r in rows
    ]


# --- the command's output -----------------------------------------------------------------------------


def cache_line(data) -> str:
    """Where the tokenized rows now sit: `train` with the same data settings reads these files, tokenizing nothing."""
    from os.path import commonpath

    files = {f["filename"] for part in (data.train, data.eval) if part is not None for f in part.cache_files}
    if not files:
        return "cache: none (rows held in memory, e.g. a hub dataset streamed without files, are tokenized by train)"
    return (
        f"cache: {len(files)} Arrow file(s) under {commonpath(sorted(files))}: train reads them instead of tokenizing"
    )


def preview(recipe, tokenizer, *, show: int, color: bool, as_json: bool) -> str:
    """The recipe's training rows, prepared exactly as `train` prepares them: data lines, summary, `show` rows."""
    import json
    from dataclasses import asdict

    from mixtral_ft.data.rows import ROWS

    method, max_length = recipe.train.method, recipe.train.max_length
    data = ROWS[method](recipe, tokenizer)
    summary = summarize(data, method, max_length, tokenizer.eos_token_id)
    if as_json:
        reports = [asdict(report) for report in data.reports]
        rows = shown_json(data, method, tokenizer, show)
        return json.dumps({"reports": reports, "summary": summary, "rows": rows}, ensure_ascii=False)
    lines = [report.line() for report in data.reports] + summary_lines(summary) + [cache_line(data)]
    return "\n".join(lines + show_rows(data, method, tokenizer, show, color=color))
