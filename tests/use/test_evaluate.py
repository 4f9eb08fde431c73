"""`mixtral-ft eval`: finite base and adapter perplexity on held-out rows, eval.json, and bad input."""

import json
import math
from pathlib import Path

import pytest
import yaml

from mixtral_ft.cli import main
from tests.conftest import trained_adapter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    return trained_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def report(adapter_run):
    code = main(["eval", str(adapter_run), "--samples", "2", "--max-new-tokens", "6"])
    assert code == 0
    return json.loads((adapter_run / "eval.json").read_text())


@pytest.mark.slow
def test_base_and_adapter_perplexity_are_finite(report):
    scores = report["scores"]
    assert set(scores) == {"base", "adapter"}
    for score in scores.values():
        assert math.isfinite(score["loss"]) and math.isfinite(score["perplexity"]) and score["perplexity"] > 1
    # One loaded model serves both columns: with the adapter switched off it must really be the base.
    assert scores["base"]["loss"] != scores["adapter"]["loss"]
    # The recipe's held-out split: test_size 0.1 of the bundled sample, split with the run's seed.
    assert report["rows"] > 0 and report["assistant_tokens"] > 0 and "test_size 0.1" in report["data"]


@pytest.mark.slow
def test_eval_json_holds_side_by_side_samples(report, capsys):
    assert len(report["samples"]) == 2
    for sample in report["samples"]:
        assert {"prompt", "reference", "base", "adapter"} <= set(sample)
        assert sample["prompt"] and sample["reference"] and "[INST]" not in sample["prompt"]
    assert report["generation"]["temperature"] == 0.0
    assert report["model"] == "tiny" and report["adapter_dir"]


@pytest.mark.slow
def test_the_card_shows_the_scores_of_this_folder_only(adapter_run, report, tmp_path):
    from mixtral_ft.train.card import render_card

    card = render_card(adapter_run, "adapter")
    assert "## Evaluation" in card and f"| adapter | {report['scores']['adapter']['loss']} |" in card
    other = tmp_path / "other"  # an eval.json copied beside another adapter scored this one: not that one's
    other.mkdir()
    (other / "eval.json").write_text((adapter_run / "eval.json").read_text())
    assert "## Evaluation" not in render_card(other, "adapter")


@pytest.mark.slow
def test_base_column_matches_a_base_only_eval(adapter_run, report, tmp_path):
    # A recipe whose output_dir holds no adapter evaluates the base alone, on the same held-out rows.
    recipe = yaml.safe_load((adapter_run / "recipe.yaml").read_text())
    recipe["train"]["output_dir"] = str(tmp_path / "no_run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "base_eval.json"
    assert main(["eval", str(path), "--samples", "0", "--out", str(out)]) == 0
    base_only = json.loads(out.read_text())
    assert set(base_only["scores"]) == {"base"} and base_only["adapter_dir"] is None
    assert base_only["scores"]["base"]["loss"] == pytest.approx(report["scores"]["base"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_data_file_is_held_out_whole(adapter_run, tmp_path):
    data = tmp_path / "held_out.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(3)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(adapter_run),
                "--data",
                str(data),
                "--samples",
                "1",
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["rows"] == 3 and report["data"] == str(data)
    assert all(math.isfinite(s["perplexity"]) for s in report["scores"].values())


def test_recipe_without_held_out_rows_asks_for_data(tmp_path, capsys):
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["data"]["test_size"] = 0.0
    recipe["train"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["eval", str(path)]) == 2
    assert "pass --data FILE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing.txt", "neither a training output folder nor a .yaml recipe"),
        (lambda tmp: tmp, "has no recipe.yaml"),
    ],
)
def test_bad_target_is_one_line_and_exit_2(make, message, tmp_path, capsys):
    assert main(["eval", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bad_adapter_and_samples_are_refused(capsys):
    assert main(["eval", str(ROOT / "recipes" / "tiny.yaml"), "--adapter", "/nonexistent"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert main(["eval", str(ROOT / "recipes" / "tiny.yaml"), "--samples", "-1"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_out_that_is_a_folder_or_another_file_is_refused_before_scoring(adapter_run, capsys):
    recipe = (adapter_run / "recipe.yaml").read_bytes()
    unwritable = Path("/proc/mixtral-ft-no-such-folder/eval.json")  # no one can create a folder in /proc
    cases = (
        (adapter_run, "is a folder"),
        (adapter_run / "recipe.yaml", "is not an eval report"),
        (unwritable, "cannot write"),
    )
    for out, message in cases:
        assert main(["eval", str(adapter_run), "--samples", "0", "--max-rows", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert (adapter_run / "recipe.yaml").read_bytes() == recipe  # the run's recipe is not replaced by a report


def test_a_merged_folder_is_scored_as_merged_not_requantized(adapter_run, tmp_path):
    """Its own weights, not its run's base; and as written: NF4 would quantize them again and score (as `merged`)
    a model that lost much of what the adapter changed (tiny run: two thirds)."""
    merged, rows = tmp_path / "merged", ["--samples", "0", "--max-rows", "3"]
    assert main(["merge", str(adapter_run), "--out", str(merged), "--dtype", "float32"]) == 0
    assert main(["eval", str(adapter_run), *rows, "--out", str(tmp_path / "run.json")]) == 0
    assert main(["eval", str(merged), *rows]) == 0
    report = json.loads((merged / "eval.json").read_text())
    assert report["model"] == str(merged) and list(report["scores"]) == ["merged"]  # not its run's base
    assert report["weights"] == "unquantized"
    run = json.loads((tmp_path / "run.json").read_text())["scores"]
    change = run["adapter"]["loss"] - run["base"]["loss"]
    assert abs(report["scores"]["merged"]["loss"] - run["adapter"]["loss"]) < 0.01 * abs(change), (run, report)


def test_a_merged_folder_with_its_own_adapter_again_is_refused(adapter_run, tmp_path, capsys):
    """Scoring merged + the adapter merged into it would count the adapter twice: chat refuses it, so does eval."""
    merged = tmp_path / "merged"
    assert main(["merge", str(adapter_run), "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["eval", str(merged), "--adapter", str(adapter_run), "--samples", "0", "--max-rows", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already has adapter" in err[0] and "drop --adapter" in err[0], err
    assert not (merged / "eval.json").exists()


def eval_report(tmp_path, name: str, *argv: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["eval", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_adapter_flag_scores_that_adapter_against_the_base(adapter_run, tmp_path):
    recipe = yaml.safe_load((adapter_run / "recipe.yaml").read_text())
    recipe["train"]["output_dir"] = str(tmp_path / "no_run")  # no adapter of its own
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rows = ["--samples", "0", "--max-rows", "2"]
    given = eval_report(tmp_path, "given", str(path), "--adapter", str(adapter_run), *rows)
    own = eval_report(tmp_path, "own", str(adapter_run), *rows)
    assert list(given["scores"]) == ["base", "adapter"] and given["adapter_dir"] == str(adapter_run)
    assert given["scores"] == own["scores"]  # the same numbers as the run's folder, which brings its adapter
    assert list(eval_report(tmp_path, "bare", str(path), *rows)["scores"]) == ["base"]


@pytest.mark.slow
def test_max_rows_caps_the_rows_scored(adapter_run, tmp_path):
    one, two = (eval_report(tmp_path, f"r{n}", str(adapter_run), "--samples", "0", "--max-rows", n) for n in "12")
    assert (one["rows"], two["rows"]) == (1, 2)
    assert 0 < one["assistant_tokens"] < two["assistant_tokens"]


@pytest.mark.slow
def test_generation_flags_shape_the_samples(adapter_run, tmp_path):
    rows = [str(adapter_run), "--samples", "1", "--max-rows", "1"]
    short = eval_report(tmp_path, "short", *rows, "--max-new-tokens", "3")
    long = eval_report(tmp_path, "long", *rows, "--max-new-tokens", "12")
    assert short["generation"] == {"max_new_tokens": 3, "temperature": 0.0, "top_p": 0.95, "seed": None}
    for name in ("base", "adapter"):  # greedy: 3 tokens are the start of the 12
        a, b = short["samples"][0][name], long["samples"][0][name]
        assert b.startswith(a) and len(b) > len(a), (a, b)
    # Sampling, narrowed by --top-p to the top token, is the greedy reply; --seed makes sampling repeatable.
    narrow = eval_report(tmp_path, "narrow", *rows, "--max-new-tokens", "12", "--temperature", "1", "--top-p", "1e-9")
    assert narrow["generation"]["temperature"] == 1.0 and narrow["generation"]["top_p"] == 1e-9
    assert narrow["samples"] == long["samples"]
    sampled = [eval_report(tmp_path, f"s{i}", *rows, "--temperature", "1", "--seed", "5") for i in range(2)]
    assert sampled[0]["samples"] == sampled[1]["samples"] and sampled[0]["generation"]["seed"] == 5
    assert sampled[0]["samples"] != long["samples"]  # temperature 1 with top-p 0.95 samples on a random model


@pytest.mark.slow
@pytest.mark.parametrize("attn, expected", [([], "sdpa"), (["--attn-implementation", "eager"], "eager")])
def test_attn_implementation_flag_picks_the_kernel(attn, expected, adapter_run, tmp_path, monkeypatch):
    from mixtral_ft.use import evaluate

    real, kernels = evaluate.load_for_inference, []

    def spy(*args, **kwargs):  # the real load; only the kernel the model got is kept
        model, tokenizer = real(*args, **kwargs)
        kernels.append(model.config._attn_implementation)
        return model, tokenizer

    monkeypatch.setattr(evaluate, "load_for_inference", spy)
    eval_report(tmp_path, "attn", str(adapter_run), "--samples", "0", "--max-rows", "1", *attn)
    assert kernels == [expected]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "0", "--max-new-tokens", "4"], "--max-new-tokens would change nothing"),
        (["--samples", "0", "--temperature", "1", "--seed", "2"], "--temperature and --seed would change nothing"),
        (["--top-p", "0.9"], "--top-p would change nothing (sampling only, and --temperature is 0, greedy, by default"),
        (["--temperature", "0", "--seed", "3"], "--seed would change nothing (sampling only"),
    ],
)
def test_generation_flags_that_would_change_nothing_are_refused(argv, message, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(ROOT / "recipes" / "tiny.yaml"), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()
