"""Recipe keys passed straight to transformers: train.save_total_limit and train.neftune_noise_alpha, on real tiny
runs (CPU), and which of them may change when a run resumes."""

import json
import signal

import pytest
import torch

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe
from mixtral_ft.train.resume import find_resume_checkpoint, newest_complete
from tests.conftest import TINY_RECIPE, adapter_bytes, make_checkpoint, signal_at, train

# Save every step, keep the newest 2, and NEFTune on: the resume below is exact with the noise drawn too.
KEEP2 = ("train.max_steps=4", "train.save_steps=1", "train.save_total_limit=2", "train.neftune_noise_alpha=5")


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def first_loss(out) -> float:
    return json.loads((out / "run.json").read_text())["losses"][0]["loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys") / "uninterrupted"
    code, err = train(out, *KEEP2)
    assert code == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_save_total_limit_keeps_the_newest_two_and_a_resume_is_still_exact(uninterrupted, tmp_path, capsys):
    assert checkpoints(uninterrupted) == ["checkpoint-3", "checkpoint-4"]
    out = tmp_path / "resumed"
    with signal_at(3, signal.SIGINT):
        assert train(out, *KEEP2)[0] == 130
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert newest_complete(out) == (out / "checkpoint-3", [])
    capsys.readouterr()
    code, err = train(out, *KEEP2)
    assert code == 0, err[-3000:]
    assert f"resume: continuing from {out / 'checkpoint-3'} (step 3)" in capsys.readouterr().out
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-4"]
    assert adapter_bytes(out) == adapter_bytes(uninterrupted)


@pytest.mark.slow
def test_neftune_reaches_the_trainer_and_noises_the_training_forward(uninterrupted, tmp_path):
    args = torch.load(uninterrupted / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert args.neftune_noise_alpha == 5.0 and args.save_total_limit == 2
    plain = tmp_path / "plain"
    assert train(plain, "train.max_steps=1")[0] == 0
    # Step 1's loss comes from the same weights and batch in both runs: only the embeddings' noise differs.
    assert first_loss(uninterrupted) != pytest.approx(first_loss(plain), rel=1e-4)
    assert torch.load(plain / "training_args.bin", weights_only=False).neftune_noise_alpha is None


def test_save_total_limit_may_change_on_resume_and_the_training_keys_may_not(tmp_path):
    out = tmp_path / "run"
    make_checkpoint(out, 2)

    def recipe(*overrides: str):
        return load_recipe(TINY_RECIPE, [f"train.output_dir={out}", *overrides])

    assert find_resume_checkpoint(recipe("train.save_total_limit=3"), out) == out / "checkpoint-2"
    for changed, shown in (
        ("train.neftune_noise_alpha=5", "train.neftune_noise_alpha: None -> 5.0"),
        ("lora.use_rslora=true", "lora.use_rslora: False -> True"),
    ):
        with pytest.raises(UserError, match=f"different recipe \\({shown}\\)"):
            find_resume_checkpoint(recipe(changed), out)
