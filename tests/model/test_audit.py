"""The audit fails loudly on what would silently waste memory or train the wrong weights."""

import json

from torch import nn

from mixtral_ft.cli import main
from mixtral_ft.model.audit import audit_model, classify
from mixtral_ft.model.load import load_model
from tests.conftest import ROOT


def fresh(tiny_dir):
    return load_model(str(tiny_dir), device="cpu", compute_dtype="float32")


def test_groups_are_named_for_mixtral_parameters():
    assert classify("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert classify("model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora"
    assert classify("model.layers.0.mlp.experts.gate_up_proj") == "experts"
    assert classify("model.layers.0.mlp.gate.weight") == "router"
    assert classify("model.layers.0.input_layernorm.weight") == "norms"
    assert classify("model.embed_tokens.weight") == "embeddings"
    assert classify("lm_head.weight") == "lm_head"


def test_a_dense_attention_weight_fails(tiny_dir):
    model = fresh(tiny_dir)
    attn = model.model.layers[1].self_attn
    attn.v_proj = nn.Linear(attn.v_proj.in_features, attn.v_proj.out_features, bias=False).requires_grad_(False)
    report = audit_model(model)
    assert not report.ok
    assert any("layers.1.self_attn.v_proj.weight" in f and "not 4-bit" in f for f in report.failures)


def test_anything_but_lora_trainable_fails(tiny_dir):
    model = fresh(tiny_dir)
    model.model.norm.weight.requires_grad_(True)
    report = audit_model(model)
    assert not report.ok
    assert any("model.norm.weight is trainable" in f for f in report.failures)
    assert "FAIL:" in report.table()


def test_cli_audit_json(capsys):
    assert main(["audit", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["expert_bytes_per_param"] <= 0.57
    groups = {row["group"]: row for row in report["rows"]}
    assert groups["experts"]["dtypes"] == ["nf4"] and groups["router"]["dtypes"] != ["nf4"]
    assert all(row["trainable"] == 0 for row in report["rows"])


def test_audit_of_a_recipe_includes_its_lora(capsys):
    assert main(["audit", "recipes/tiny.yaml", "lora.r=4"]) == 0
    out = capsys.readouterr().out
    lora_line = next(line for line in out.splitlines() if line.startswith("lora"))
    # r * (in + out) per target: q and o are 64 -> 64, k and v 64 -> 32; two layers.
    assert int(lora_line.split()[-1].replace(",", "")) == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2)
    assert "audit: ok" in out


def test_bf16_experts_flag_applies_to_a_recipe_too(tmp_path, capsys):
    """It was silently ignored for a recipe (the audit showed NF4 experts); an upper-case .YAML is a recipe too."""
    recipe = tmp_path / "TINY.YAML"
    recipe.write_text((ROOT / "recipes" / "tiny.yaml").read_text())
    assert main(["audit", str(recipe), "--bf16-experts", "--json"]) == 0
    groups = {row["group"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert groups["experts"]["dtypes"] == ["float32"] and groups["lora"]["trainable"] > 0


def test_bf16_experts_flag_on_a_model_and_overrides_refused_there(capsys):
    assert main(["audit", "tiny", "--bf16-experts", "--json"]) == 0
    groups = {row["group"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert groups["experts"]["dtypes"] == ["float32"] and groups["attention"]["dtypes"] == ["nf4"]
    assert main(["audit", "tiny", "lora.r=4"]) == 2  # a bare model has no recipe for them to change
    assert "overrides apply to recipes only" in capsys.readouterr().err
