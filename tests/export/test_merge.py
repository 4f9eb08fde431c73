"""Merge: the merged model is adapter-on-NF4-base and loads with plain transformers.

The adapter and the merged folders come from tests/export/conftest.py (one tiny training run per package).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixtral_ft.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
pytestmark = pytest.mark.numeric  # .ci/run runs these again with the CPU bf16 detection forced the other way
# The bf16 merge is judged relative to the logits' scale (mean |logit|): bf16 rounds each merged weight
# by <= 2^-9 (0.2%), NF4 moves it by up to ~7% of its block's absmax, and the logits inherit that ~50x
# ratio. On the tiny model a bf16 merge into the NF4 weights is off by ~1% of mean |logit| and a merge
# into the original weights by ~60%, so 5% accepts the first and rejects the second.
BF16_REL_TOL = 0.05
FP32_MAX_TOL = 1e-4  # fp32 merge: only summation order differs from adapter-on-base


@pytest.fixture(scope="module")
def logits(merged, adapter, tiny_dir, tmp_path_factory):
    """Logits of each merged folder (plain transformers, fresh process) and of adapter-on-NF4-base."""
    from peft import PeftModel

    from mixtral_ft.model.load import load_model

    dirs, _ = merged
    work = tmp_path_factory.mktemp("logits")
    ids = torch.randint(3, 32000, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "ids = torch.load(sys.argv[1])\n"
        "for d in sys.argv[3:]:\n"
        "    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.save(m(ids).logits, f'{sys.argv[2]}/{d.rsplit(\"/\", 1)[-1]}.pt')\n"
        "from transformers import AutoTokenizer\n"
        "assert AutoTokenizer.from_pretrained(sys.argv[3])('Hello').input_ids[0] == 1  # <s>\n"
        "assert not [m for m in sys.modules if m.startswith('mixtral_ft')], 'mixtral_ft was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(work / "ids.pt"), str(work), *map(str, dirs.values())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        base = load_model(str(tiny_dir), compute_dtype="float32", device="cpu")
        plain = base(ids).logits
        reference = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    got = {name: torch.load(work / f"{name}.pt") for name in dirs}
    return reference, plain, got


def rel_diff(a, b) -> float:
    """Mean |a - b| relative to mean |b|."""
    return ((a - b).abs().mean() / b.abs().mean()).item()


@pytest.mark.slow
def test_dequantized_merge_is_adapter_on_nf4_base(logits):
    reference, plain, got = logits
    print({name: (rel_diff(t, reference), (t - reference).abs().max().item()) for name, t in got.items()})
    assert (got["deq32"] - reference).abs().max().item() < FP32_MAX_TOL
    assert (got["fused32"] - reference).abs().max().item() < FP32_MAX_TOL
    assert rel_diff(got["deq"], reference) < BF16_REL_TOL
    # The tolerance has teeth: merging into the original bf16 weights fails it, and so would a lost adapter.
    assert rel_diff(got["orig"], reference) > BF16_REL_TOL
    assert rel_diff(plain, reference) > BF16_REL_TOL


@pytest.mark.slow
def test_original_mode_merges_into_the_checkpoint_weights(merged, tiny_dir):
    dirs, _ = merged
    source, deq, orig = (load_file(str(d / "model.safetensors")) for d in (tiny_dir, dirs["deq"], dirs["orig"]))
    assert set(orig) == set(source) == set(deq)  # legacy per-expert names kept
    expert = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    assert torch.equal(orig[expert], source[expert])  # original: untouched
    assert not torch.equal(deq[expert], source[expert])  # dequantized: NF4 round trip
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(orig[q], source[q]) and not torch.equal(orig[q], deq[q])
    assert all(t.dtype == torch.bfloat16 for t in deq.values())
    assert json.loads((dirs["orig"] / "merge.json").read_text())["base_weights"] == "original"


@pytest.mark.slow
def test_legacy_experts_are_quantized_as_fused_layers(merged):
    from mixtral_ft.export.merge import nf4_roundtrip

    dirs, _ = merged
    legacy, fused = (load_file(str(dirs[n] / "model.safetensors")) for n in ("deq32", "fused32"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused  # fused source stays fused
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts."
        w = {k: torch.stack([legacy[f"{prefix}{e}.{k}.weight"] for e in range(4)]) for k in ("w1", "w2", "w3")}
        assert torch.equal(torch.cat([w["w1"], w["w3"]], 1), fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"])
        assert torch.equal(w["w2"], fused[f"model.layers.{layer}.mlp.experts.down_proj"])
    # Why: per-expert NF4 has other double-quant statistics than the loader's whole-layer NF4.
    stack = torch.randn(4, 128, 64).to(torch.bfloat16)
    per_expert = torch.stack([nf4_roundtrip(stack[e]) for e in range(4)])
    assert (per_expert - nf4_roundtrip(stack)).abs().max() > 1e-3


@pytest.mark.slow
def test_sharded_checkpoint_keeps_its_shards_and_experts_split_across_them(merged, adapter, tiny_dir, tmp_path):
    from safetensors.torch import save_file

    dirs, _ = merged
    source = tmp_path / "sharded"
    source.mkdir()
    state = load_file(str(tiny_dir / "model.safetensors"))
    names = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    weight_map = {key: names[i % 3] for i, key in enumerate(sorted(state))}  # every layer's experts span shards
    for name in names:
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, str(source / name))
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for extra in tiny_dir.iterdir():
        if extra.suffix != ".safetensors":
            (source / extra.name).write_bytes(extra.read_bytes())
    out = tmp_path / "out"
    assert main(["merge", str(adapter), "--out", str(out), "--base", str(source), "--dtype", "float32"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    expected = load_file(str(dirs["deq32"] / "model.safetensors"))
    for name in names:
        shard = load_file(str(out / name))
        assert set(shard) == {k for k, f in weight_map.items() if f == name}
        assert all(torch.equal(t, expected[k]) for k, t in shard.items())


@pytest.mark.slow
def test_verify_report_is_printed_written_and_in_the_card(merged):
    dirs, printed = merged
    report = json.loads((dirs["deq"] / "verify.json").read_text())
    assert report["samples"] > 0 and "eval split" in report["source"]
    assert 0 <= report["mean_abs_logit_diff"] < BF16_REL_TOL * report["mean_abs_logit"]
    assert report["perplexity_merged"] == pytest.approx(report["perplexity_adapter_on_base"], rel=1e-2)
    assert re.search(r"verify: logits \|merged - adapter-on-base\|: max \S+, mean \S+", printed["deq"])
    assert "verify: perplexity (assistant tokens): adapter-on-base" in printed["deq"]
    card = (dirs["deq"] / "README.md").read_text()
    assert "## Verification" in card and f"{report['max_abs_logit_diff']:.6g}" in card
    assert "library_name: transformers" in card and "NF4-dequantized" in card


@pytest.mark.parametrize("case", ["base_of_another_shape", "bad_verify_device", "device_without_verify"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, adapter, tmp_path, capsys):
    from tests.conftest import other_shape_model

    out = tmp_path / "out"
    argv, expect = {
        "base_of_another_shape": (["--base", str(other_shape_model(tmp_path / "wide"))], "pass the base"),
        "bad_verify_device": (["--verify", "--device", "banana"], "--device 'banana' is not a device"),
        # Merging runs on the CPU whatever --device says: without --verify the flag would do nothing.
        "device_without_verify": (["--device", "cpu"], "--device cpu applies to --verify only"),
    }[case]
    assert main(["merge", str(adapter), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("merge: [")]  # progress lines may precede
    assert len(errors) == 1 and errors[0].startswith("error:") and expect in errors[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_out_inside_the_adapter_folder_is_refused(adapter, capsys):
    """A merged model inside the run's folder would go up with the adapter on the next `push` of it."""
    assert main(["merge", str(adapter), "--out", str(adapter / "merged")]) == 2
    assert "is inside the adapter folder" in capsys.readouterr().err
    assert not (adapter / "merged").exists()
