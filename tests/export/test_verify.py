"""`mixtral-ft merge --verify` measures the merge: fp32 on both sides, a stated tolerance, a verdict, exit 1."""

import json

import pytest

from mixtral_ft.cli import main
from mixtral_ft.export import merge as export
from tests.conftest import requires_cuda, trained_adapter

pytestmark = [pytest.mark.slow, pytest.mark.numeric]


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    return trained_adapter(tmp_path_factory)


def merge(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["merge", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fp32_merge_verifies_ok_and_states_its_tolerance(adapter_run, tmp_path, capsys):
    out = tmp_path / "m32"
    code, printed, err = merge([str(adapter_run), "--out", str(out), "--dtype", "float32", "--verify"], capsys)
    assert code == 0, err
    report = json.loads((out / "verify.json").read_text())
    assert report["verdict"] == "ok" and report["compute_dtype"] == "float32"
    assert report["weights_dtype"] == "float32" and report["relative_tolerance"] == 1e-5
    assert report["mean_abs_logit_diff"] < 1e-4 and report["mean_abs_logit_diff"] <= report["tolerance"]
    assert report["tolerance"] == pytest.approx(1e-5 * report["mean_abs_logit"])
    assert report["adapted_weights"] == 8 and report["adapted_weights_off"] == []  # q/k/v/o in 2 layers
    assert "verify: ok: mean |Δlogit|" in printed and "tolerance" in printed and "float32 weights" in printed
    assert "Verdict: **ok**" in (out / "README.md").read_text()


def test_bf16_merge_is_judged_by_bf16_rounding_and_still_computed_in_fp32(adapter_run, tmp_path, capsys):
    out = tmp_path / "mbf16"
    code, printed, err = merge([str(adapter_run), "--out", str(out), "--dtype", "bfloat16", "--verify"], capsys)
    assert code == 0, err
    report = json.loads((out / "verify.json").read_text())
    assert report["verdict"] == "ok" and report["compute_dtype"] == "float32"
    assert report["weights_dtype"] == "bfloat16" and report["relative_tolerance"] == 5e-2
    assert report["mean_abs_logit_diff"] > 1e-5 * report["mean_abs_logit"]  # bf16 rounding shows, and is allowed


def test_merge_with_the_lora_scale_doubled_fails_verify_and_exits_1(adapter_run, tmp_path, capsys, monkeypatch):
    """A deliberately wrong merge: W + 2·scale·B·A written, adapter-on-base (scale·B·A) as the reference."""
    read_lora = export.read_lora

    def doubled(adapter):
        return {key: (a, b, 2 * scale) for key, (a, b, scale) in read_lora(adapter).items()}

    monkeypatch.setattr(export, "read_lora", doubled)
    out = tmp_path / "wrong"
    code, printed, err = merge([str(adapter_run), "--out", str(out), "--dtype", "float32", "--verify"], capsys)
    assert code == 1
    report = json.loads((out / "verify.json").read_text())
    assert report["verdict"] == "FAILED" and report["mean_abs_logit_diff"] > report["tolerance"]
    assert "verify: FAILED: mean |Δlogit|" in printed
    # Progress bars and merge's progress lines (`merge: [12s] ...`) aside, one error line.
    errors = [
        line for line in err.splitlines() if line.strip() and "%|" not in line and not line.startswith("merge: [")
    ]
    assert errors == [f"merge --verify FAILED: see {out}/verify.json"]


def test_bf16_merge_missing_one_layers_lora_fails_verify(adapter_run, tmp_path, capsys, monkeypatch):
    """bf16 rounding hides a LoRA dropped from layer 1 in the logits; the adapted weights, checked element by
    element against peft's dequant(NF4 W) + scale·B·A, show it."""
    read_lora = export.read_lora

    def without_layer_1(adapter):
        return {key: lora for key, lora in read_lora(adapter).items() if ".layers.1." not in key}

    monkeypatch.setattr(export, "read_lora", without_layer_1)
    out = tmp_path / "half"
    code, printed, _ = merge([str(adapter_run), "--out", str(out), "--dtype", "bfloat16", "--verify"], capsys)
    assert code == 1
    report = json.loads((out / "verify.json").read_text())
    assert report["verdict"] == "FAILED"
    assert report["mean_abs_logit_diff"] <= report["tolerance"]  # the logit check alone passes it
    assert report["adapted_weights"] == 8 and report["adapted_weight_error_ratio"] > 10
    assert sorted(report["adapted_weights_off"]) == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "koqv"]
    assert "4 of 8 within their dtype's rounding" in printed and "4 adapted weights off" in printed


def test_original_weights_merge_is_verified_against_the_original_base(adapter_run, tmp_path, capsys):
    """Its reference is the adapter on the checkpoint's own weights (held to the NF4 one it would be ~60% off):
    in fp32 only summation order differs, so it meets fp32's tolerance and every adapted weight is exact."""
    out = tmp_path / "orig32"
    argv = [str(adapter_run), "--out", str(out), "--base-weights", "original", "--dtype", "float32", "--verify"]
    code, printed, err = merge(argv, capsys)
    assert code == 0, err
    report = json.loads((out / "verify.json").read_text())
    assert report["verdict"] == "ok" and report["reference"] == "adapter on the checkpoint's original weights"
    assert report["mean_abs_logit_diff"] <= report["tolerance"] == pytest.approx(1e-5 * report["mean_abs_logit"])
    assert report["adapted_weights"] == 8 and report["adapted_weights_off"] == []
    assert report["adapted_weight_error_ratio"] <= 1
    assert "reference: adapter on the checkpoint's original weights" in printed
    assert "Merged model against the adapter on the checkpoint's original weights" in (out / "README.md").read_text()


def test_original_weights_merge_with_the_lora_scale_doubled_fails_verify(adapter_run, tmp_path, capsys, monkeypatch):
    read_lora = export.read_lora

    def doubled(adapter):
        return {key: (a, b, 2 * scale) for key, (a, b, scale) in read_lora(adapter).items()}

    monkeypatch.setattr(export, "read_lora", doubled)
    out = tmp_path / "orig-wrong"
    argv = [str(adapter_run), "--out", str(out), "--base-weights", "original", "--dtype", "bfloat16", "--verify"]
    code, printed, _ = merge(argv, capsys)
    assert code == 1
    report = json.loads((out / "verify.json").read_text())
    assert report["verdict"] == "FAILED" and len(report["adapted_weights_off"]) == 8
    assert "verify: FAILED" in printed


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("base_weights", ["dequantized", "original"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_verify_runs_on_the_device_given(device, base_weights, adapter_run, tmp_path, capsys):
    """On a GPU machine the default is cuda, so --device cpu must show in verify.json to have been obeyed; both
    references (NF4 base, original weights) load and score on either device and give `ok`."""
    out = tmp_path / f"{device}-{base_weights}"
    argv = [str(adapter_run), "--out", str(out), "--dtype", "float32", "--base-weights", base_weights]
    code, _, err = merge([*argv, "--verify", "--device", device], capsys)
    assert code == 0, err
    report = json.loads((out / "verify.json").read_text())
    assert report["device"].startswith(device) and report["verdict"] == "ok"
