"""Which LoRA merge folds in beyond the attention, and the one-line refusal for what it cannot.

LoRA on embed_tokens (lora.allow_other_targets): peft stores it as lora_embedding_A [r, vocab] and lora_embedding_B
[hidden, r], not lora_A/lora_B, and its delta is (B·A)ᵀ. Checked against peft's own delta on a real tiny run (one
constant-rate step, so A has moved from its zero init). The router `gate` is a parameter peft wraps
(target_parameters): refused, with the way to use such an adapter.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from mixtral_ft.cli import main
from tests.conftest import adapter_bytes, train

EMBED = "model.embed_tokens.weight"


@pytest.mark.slow
@pytest.mark.numeric
def test_embed_tokens_lora_saves_lora_only_resumes_and_is_merged_as_peft_computes_it(tmp_path, capsys):
    """Every save (checkpoints, the final adapter) holds LoRA tensors only, not peft's copy of the base embedding
    (save_embedding_layers="auto" added it: 8 MB here, 262 MB a save on Mixtral); resume and merge do not need it."""
    from mixtral_ft.model.load import load_adapter, load_model
    from mixtral_ft.model.source import resolve_model_path

    adapter = tmp_path / "adapter"
    targets = ["lora.allow_other_targets=true", "lora.target_modules=[q_proj, embed_tokens]"]
    run = [*targets, "train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.save_steps=3"]
    code, err = train(adapter, *run)
    assert code == 0, err[-3000:]
    base = load_file(str(resolve_model_path("tiny") / "model.safetensors"))[EMBED].float()
    for saved in (adapter, adapter / "checkpoint-3", adapter / "checkpoint-6"):
        keys = load_file(str(saved / "adapter_model.safetensors")).keys()
        assert all(".lora_" in key for key in keys) and any("embed_tokens.lora_" in key for key in keys), sorted(keys)
        assert (saved / "adapter_model.safetensors").stat().st_size < base.nbytes / 2
    # Resumed from checkpoint-3 (which holds no base embedding), it ends where the uninterrupted run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(adapter / "checkpoint-3", resumed / "checkpoint-3")
    capsys.readouterr()
    code, err = train(resumed, *run)
    assert code == 0, err[-3000:]
    assert f"resume: continuing from {resumed / 'checkpoint-3'} (step 3)" in capsys.readouterr().out
    assert adapter_bytes(resumed) == adapter_bytes(adapter)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))[EMBED]
    model = load_adapter(load_model("tiny", device="cpu", compute_dtype="float32"), adapter)
    delta = model.get_base_model().model.embed_tokens.get_delta_weight("default").float()
    assert delta.abs().max() > 0  # the adapter moved the embeddings: a merge that skips them is caught
    torch.testing.assert_close(merged, base + delta, rtol=0, atol=1e-6)


def test_an_adapter_merge_cannot_fold_is_refused_in_one_line_naming_the_way_out(tmp_path, capsys):
    """As `lora.target_modules: [q_proj, gate]` writes it: peft records the router under target_parameters."""
    import json

    adapter = tmp_path / "gate_adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "tiny", "r": 4, "lora_alpha": 8}
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"target_parameters": ["mlp.gate.weight"]}))
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "['target_parameters']" in err[0] and "--adapter" in err[0], err
    assert not (tmp_path / "merged").exists()
