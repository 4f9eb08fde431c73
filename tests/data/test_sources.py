"""data.mixture: seeded weighted sampling of several sources, per-source eval rows and reports, for SFT and DPO."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mixtral_ft.data.conversations import load_sft_data
from mixtral_ft.data.prefs import load_preference_data
from mixtral_ft.data.sources import mixture_counts
from mixtral_ft.data.tokenizer import load_tokenizer
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection, MixtureSource, load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def conversation(question: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "Sure."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, mode="finetuning")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three files whose rows tell their source apart: 10, 30 and 5 distinct conversations."""
    tmp = tmp_path_factory.mktemp("mixture")
    return {
        name: write_jsonl(tmp / f"{name}.jsonl", [conversation(f"{name} question {i}") for i in range(n)])
        for name, n in (("alpha", 10), ("beta", 30), ("gamma", 5))
    }


def mixture(sources, weights: dict[str, float], **data) -> DataSection:
    entries = tuple(MixtureSource(path=str(sources[name]), weight=w) for name, w in weights.items())
    return DataSection(mixture=entries, **data)


def source_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).split("[INST] ")[1].split(" question")[0]


def test_counts_add_up_and_follow_the_weights():
    assert mixture_counts([0.7, 0.3], 1000) == [700, 300]
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]  # largest remainders, ties to the first
    for weights, total in (([3, 2, 0.5], 997), ([1e-3, 1], 50), ([5, 5, 5, 5], 3)):
        counts = mixture_counts(weights, total)
        assert sum(counts) == total
        assert all(abs(c - w / sum(weights) * total) < 1 for c, w in zip(counts, weights))


def test_proportions_match_the_weights_over_1000_rows(tokenizer, sources):
    weights = {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}
    data = load_sft_data(mixture(sources, weights, mixture_size=1000), tokenizer, max_length=128, seed=3)
    assert len(data.train) == 1000
    counts = Counter(source_of(tokenizer, ids) for ids in data.train["input_ids"])
    for name, weight in weights.items():
        assert abs(counts[name] / 1000 - weight) <= 0.05, (name, counts)
    # gamma has 5 rows for 200 slots: each is repeated 40 times; beta's 30 fill 300 slots 10 times each.
    per_row = Counter(tuple(ids) for ids in data.train["input_ids"])
    assert {per_row[k] for k in per_row if source_of(tokenizer, list(k)) == "gamma"} == {40}


def test_sampling_is_seeded(tokenizer, sources):
    cfg = mixture(sources, {"alpha": 1, "beta": 1}, mixture_size=24)
    first, again, other = (load_sft_data(cfg, tokenizer, max_length=128, seed=s).train["input_ids"] for s in (1, 1, 2))
    assert first == again and first != other
    assert len({source_of(tokenizer, ids) for ids in first[:8]}) == 2  # sources are interleaved, not in blocks


def test_default_size_is_the_sum_of_the_sources(tokenizer, sources):
    data = load_sft_data(mixture(sources, {"alpha": 3, "gamma": 1}), tokenizer, max_length=128, seed=0)
    assert len(data.train) == 15
    assert Counter(source_of(tokenizer, ids) for ids in data.train["input_ids"]) == {"alpha": 11, "gamma": 4}


def test_eval_rows_per_source_and_one_report_line_each(tokenizer, sources, tmp_path):
    import datasets

    folder = tmp_path / "hub_like"  # a dataset folder with its own test split, loaded like a hub id
    (folder / "data").mkdir(parents=True)
    for split, n in (("train", 12), ("test", 3)):
        datasets.Dataset.from_list([conversation(f"delta question {split} {i}") for i in range(n)]).to_parquet(
            folder / "data" / f"{split}-00000-of-00001.parquet"
        )
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation("epsilon question 1")] * 19 + [{"messages": []}])
    cfg = DataSection(
        test_size=0.2,
        mixture=(
            MixtureSource(path=str(sources["beta"]), weight=2),  # no eval split: 20% held out before sampling
            MixtureSource(path=str(folder), weight=1, eval_split="test"),
            MixtureSource(path=str(bad), weight=1),
        ),
    )
    data = load_sft_data(cfg, tokenizer, max_length=128, seed=0)
    assert len(data.train) == 24 + 12 + 15  # sum of the train rows after the hold-outs
    evals = Counter(source_of(tokenizer, ids) for ids in data.eval["input_ids"])
    assert evals == {"beta": 6, "delta": 3, "epsilon": 4}
    train_rows = {tuple(ids) for ids in data.train["input_ids"]}
    assert not any(tuple(ids) in train_rows for ids in data.eval["input_ids"] if source_of(tokenizer, ids) == "beta")
    lines = [report.line() for report in data.reports]
    assert [line.split(": ")[1] for line in lines] == [
        f"{sources['beta']} [train]",
        f"{folder} [train]",
        f"{folder} [test]",
        f"{bad} [train]",
    ]
    assert lines[0].endswith(
        "read 30, kept 30 (6 held out for eval), dropped 0; 90 supervised tokens; mixture: weight 0.50, 25 of 51 rows "
        "(1.04x)"
    )
    assert (
        "read 20, kept 19 (4 held out for eval), dropped 1 (empty conversation: 1); " in lines[3]
        and "; mixture: weight 0.25" in lines[3]
    )
    assert "mixture" not in lines[2]  # eval rows are not resampled


def test_bad_rows_stop_a_mixture_too(tokenizer, sources, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation("x question")] * 5 + [{"messages": "oops"}] * 5)
    with pytest.raises(UserError, match="50% of rows in .*bad.jsonl \\[train\\] are unparseable"):
        load_sft_data(
            DataSection(mixture=(MixtureSource(path=str(sources["alpha"])), MixtureSource(path=str(bad)))),
            tokenizer,
            max_length=128,
            seed=0,
        )


def test_preference_mixture(tokenizer, tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"Zq{i}?", "chosen": "A good answer.", "rejected": "No."} for i in range(8)],
    )
    cfg = DataSection(
        mixture=(
            MixtureSource(path="builtin:preferences", weight=3, max_rows=20),
            MixtureSource(path=str(pairs), weight=1),
        ),
        mixture_size=40,
        test_size=0.25,
    )
    data = load_preference_data(cfg, tokenizer, max_length=256, max_prompt_length=128, seed=0)
    assert len(data.train) == 40 and len(data.eval) == 5 + 2
    assert (
        sum(tokenizer.decode(p, skip_special_tokens=True).startswith("[INST] Zq") for p in data.train["prompt_ids"])
        == 10
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.mixture=[{path: a.jsonl}]"], "'data.path' and 'data.mixture' are mutually exclusive"),
        (["data.path=null"], "missing required key 'data.path'"),
        (["data.path=null", "data.mixture=[{weight: 1}]"], "missing required key 'data.mixture[0].path'"),
        (["data.path=null", "data.mixture=[{path: a, wieght: 1}]"], "did you mean 'data.mixture[0].weight'"),
        (["data.path=null", "data.mixture=[{path: a, weight: -1}]"], "'data.mixture[0].weight' must be > 0"),
        (["data.path=null", "data.mixture=[{path: a, format: csv}]"], "'data.mixture[0].format'"),
        (["data.path=null", "data.mixture={path: a}"], "'data.mixture' must be a list of mappings"),
        (["data.mixture_size=100"], "'data.mixture_size' applies to data.mixture only"),
        (["data.path=null", "data.mixture=[{path: a}]", "data.eval_split=test"], "set split / eval_split on each"),
    ],
)
def test_recipe_errors(overrides, message):
    with pytest.raises(UserError) as info:
        load_recipe(TINY, overrides)
    assert message in str(info.value)


def test_mixture_recipe_round_trips(tmp_path):
    from mixtral_ft.recipe import dump_recipe

    recipe = load_recipe(
        TINY,
        [
            "data.path=null",
            "data.mixture_size=500",
            "data.mixture=[{path: builtin:oasst_top1, weight: 3}, {path: b.jsonl, split: train}]",
        ],
    )
    assert [(s.path, s.weight) for s in recipe.data.mixture] == [("builtin:oasst_top1", 3.0), ("b.jsonl", 1.0)]
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == recipe
