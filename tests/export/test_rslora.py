"""Rank-stabilized LoRA (`lora.use_rslora`): merge scales B·A by alpha/sqrt(r), as peft does, so the merged model is
adapter-on-NF4-base; `merge --verify` (peft on one side) catches a merge that used alpha/r."""

import json
import math

import pytest

from mixtral_ft.cli import main
from mixtral_ft.export import merge as export
from tests.conftest import train

pytestmark = [pytest.mark.slow, pytest.mark.numeric]


@pytest.fixture(scope="module")
def rslora_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("rslora") / "adapter"
    code, err = train(out, "lora.use_rslora=true", "train.max_steps=3")
    assert code == 0, err[-3000:]
    return out


def merge_verified(adapter, out, capsys) -> tuple[int, dict]:
    code = main(["merge", str(adapter), "--out", str(out), "--dtype", "float32", "--verify"])
    capsys.readouterr()
    return code, json.loads((out / "verify.json").read_text())


def test_rslora_adapter_merges_to_adapter_on_base(rslora_adapter, tmp_path, capsys):
    config = json.loads((rslora_adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and (config["r"], config["lora_alpha"]) == (16, 32)
    scales = {scale for _, _, scale in export.read_lora(rslora_adapter).values()}
    assert scales == {32 / math.sqrt(16)}  # 8, where plain LoRA's alpha/r is 2
    code, report = merge_verified(rslora_adapter, tmp_path / "merged", capsys)
    assert code == 0 and report["verdict"] == "ok"
    assert report["mean_abs_logit_diff"] < 1e-4 and report["mean_abs_logit_diff"] <= report["tolerance"]


def test_a_merge_that_ignores_rslora_fails_verify(rslora_adapter, tmp_path, capsys, monkeypatch):
    """The check has teeth on this adapter: alpha/r (peft's plain scale) is not what training computed."""
    read_lora = export.read_lora

    def plain_scale(adapter):
        return {key: (a, b, 32 / a.shape[0]) for key, (a, b, _) in read_lora(adapter).items()}

    monkeypatch.setattr(export, "read_lora", plain_scale)
    code, report = merge_verified(rslora_adapter, tmp_path / "wrong", capsys)
    assert code == 1 and report["verdict"] == "FAILED"
