"""`mixtral-ft eval` of a DPO run: its held-out pairs scored base vs adapter, with the rewards TRL's eval reports."""

import json
from pathlib import Path

import pytest

from mixtral_ft.cli import main
from mixtral_ft.use.pair_eval import implicit_rewards
from tests.conftest import trained_adapter

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = str(ROOT / "recipes" / "tiny_dpo.yaml")


def dpo_run(out: Path, *overrides: str) -> Path:
    """A short tiny DPO run whose last step is evaluated by TRL on the 5 held-out pairs, one pair per batch: then
    TRL's mean of batch means is the plain mean over pairs that `eval` reports."""
    argv = ["train.max_steps=4", "train.save_steps=4", "train.eval_steps=4", "train.per_device_train_batch_size=1"]
    assert main(["train", TINY_DPO, f"train.output_dir={out}", "logging.router_stats_steps=0", *argv, *overrides]) == 0
    return out


def evaluated(run: Path, *argv: str) -> dict:
    assert main(["eval", str(run), *argv]) == 0
    return json.loads((run / "eval.json").read_text())


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory) -> Path:
    return dpo_run(tmp_path_factory.mktemp("pair_eval") / "run")


@pytest.fixture(scope="module")
def report(fresh_run) -> dict:
    return evaluated(fresh_run, "--samples", "1", "--max-new-tokens", "4")


def assert_trls_eval_rewards(run: Path, rewards: dict) -> None:
    trl = json.loads((run / "run.json").read_text())["eval_rewards"]
    assert trl["step"] == 4 and rewards["beta"] == 0.1 and rewards["accuracy"] == trl["accuracy"]
    for key in ("margin", "chosen", "rejected"):
        # float32 sums of ~300 nats of log-probs round at ~3e-5, so rewards (beta 0.1) agree to ~3e-6
        assert rewards[key] == pytest.approx(trl[key], rel=1e-3, abs=1e-5), key
    assert rewards["margin"] != 0  # four steps moved the adapter away from its reference


@pytest.mark.slow
def test_adapter_rewards_are_trls_eval_rewards(fresh_run, report):
    assert report["rewards"]["reference"] == "base"  # a fresh adapter's reference
    assert_trls_eval_rewards(fresh_run, report["rewards"])


@pytest.mark.slow
def test_a_continued_run_is_rewarded_against_its_starting_adapter(tmp_path_factory):
    sft = trained_adapter(tmp_path_factory)
    run = dpo_run(tmp_path_factory.mktemp("pair_eval_chain") / "run", f"model.adapter={sft}")
    report = evaluated(run, "--samples", "1", "--max-new-tokens", "4")
    assert list(report["scores"]) == ["base", "reference", "adapter"] and report["rewards"]["reference"] == "reference"
    (sample,) = report["samples"]  # each variant's answer beside the pair's own two, none written over another
    assert sample["chosen"].startswith("DNA stands for deoxyribonucleic acid") and "reference" in sample
    scores = {name: score["logp_margin"] for name, score in report["scores"].items()}
    against_base = 0.1 * (scores["adapter"] - scores["base"])  # what a reward against the wrong reference reads
    assert abs(against_base - report["rewards"]["margin"]) > 1e-3
    assert_trls_eval_rewards(run, report["rewards"])


@pytest.mark.slow
def test_each_variant_scores_the_held_out_pairs(report):
    assert report["rows"] == 5 and report["data"] == "builtin:preferences [test_size 0.1 of train]"
    assert set(report["scores"]) == {"base", "adapter"} and "assistant_tokens" not in report
    for score in report["scores"].values():
        assert set(score) == {"prefers_chosen", "logp_margin"} and 0 <= score["prefers_chosen"] <= 1
    margins = report["rewards"]["margin"], report["scores"]["adapter"]["logp_margin"]
    assert margins[0] == pytest.approx(0.1 * (margins[1] - report["scores"]["base"]["logp_margin"]), abs=1e-5)
    (sample,) = report["samples"]
    assert sample["chosen"] and sample["rejected"] and {"base", "adapter"} <= set(sample)
    assert "[INST]" not in sample["prompt"]


@pytest.mark.slow
def test_the_card_shows_the_preferences_and_rewards(fresh_run, report):
    from mixtral_ft.train.card import render_card

    card = render_card(fresh_run, "adapter")
    assert (
        "| | prefers chosen | logp margin |" in card
        and f"| adapter | {report['scores']['adapter']['prefers_chosen']} |" in card
    )
    assert f"DPO rewards against base (beta 0.1): accuracy {report['rewards']['accuracy']:.2f}" in card


@pytest.mark.slow
def test_data_flag_scores_conversations_for_loss_instead(fresh_run, tmp_path):
    out = tmp_path / "conversations.json"
    argv = ["--data", "builtin:oasst_top1", "--max-rows", "2", "--samples", "0", "--out", str(out)]
    assert main(["eval", str(fresh_run), *argv]) == 0
    report = json.loads(out.read_text())
    assert set(report["scores"]["adapter"]) == {"loss", "perplexity"} and "rewards" not in report


@pytest.mark.slow
def test_data_flag_with_pairs_scores_those_pairs_for_any_run(fresh_run, tmp_path_factory, tmp_path):
    argv = ["--data", "builtin:preferences", "--max-rows", "6", "--samples", "0", "--out", str(tmp_path / "p.json")]
    for run in (fresh_run, trained_adapter(tmp_path_factory)):  # a DPO run, then an SFT run
        assert main(["eval", str(run), *argv]) == 0
        report = json.loads((tmp_path / "p.json").read_text())
        assert report["rows"] == 6 and report["data"] == "builtin:preferences"
        assert set(report["scores"]) == {"base", "adapter"} and report["rewards"]["reference"] == "base"


def test_a_dpo_recipe_without_held_out_pairs_asks_for_data(tmp_path, capsys):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(Path(TINY_DPO).read_text().replace("test_size: 0.1", "test_size: 0.0"))
    assert main(["eval", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "has no held-out pairs" in err and "--data FILE" in err and "Traceback" not in err


def test_rewards_follow_trls_definition():
    policy, reference = [(-10.0, -12.0), (-5.0, -4.0)], [(-11.0, -11.0), (-5.0, -5.0)]
    rewards = implicit_rewards(policy, reference, beta=0.5)  # chosen +0.5, 0; rejected -0.5, +0.5
    assert rewards == {"beta": 0.5, "accuracy": 0.5, "margin": 0.25, "chosen": 0.25, "rejected": 0.0}
