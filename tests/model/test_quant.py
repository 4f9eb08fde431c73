"""NF4 experts: storage, both checkpoint layouts, the transformers oracle, gradients, and memory proofs."""

import copy
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from mixtral_ft.errors import UserError
from mixtral_ft.model.audit import audit_model, dequantized_reference
from mixtral_ft.model.load import load_model
from mixtral_ft.model.quant import NF4Experts, is_4bit
from tests.conftest import requires_cuda

pytestmark = pytest.mark.numeric  # .ci/run runs these again with the CPU bf16 detection forced the other way


@pytest.fixture(scope="module")
def nf4_model(tiny_dir):
    return load_model(str(tiny_dir), device="cpu", compute_dtype="float32")


def test_every_attention_and_expert_weight_is_nf4(nf4_model):
    for layer in nf4_model.model.layers:
        assert isinstance(layer.mlp.experts, NF4Experts)
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            assert is_4bit(p) and p.quant_state.blocksize == 64 and p.quant_state.nested
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert is_4bit(getattr(layer.self_attn, name).weight)
        assert not is_4bit(layer.mlp.gate.weight)  # the router stays unquantized
    report = audit_model(nf4_model)
    assert report.ok, report.failures
    assert report.expert_bytes_per_param() <= 0.57
    assert report.row("experts").params == 2 * 4 * (2 * 128 * 64 + 64 * 128)


def test_legacy_and_fused_layouts_give_identical_logits(nf4_model, tiny_fused_dir):
    fused = load_model(str(tiny_fused_dir), device="cpu", compute_dtype="float32")
    ids = torch.randint(3, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(nf4_model(ids).logits, fused(ids).logits)


def test_logits_match_transformers_on_dequantized_weights(nf4_model):
    reference = dequantized_reference(nf4_model)
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = nf4_model(ids).logits, reference(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-3


def test_lora_gradients_match_reference(nf4_model):
    from peft import LoraConfig, get_peft_model

    reference = dequantized_reference(nf4_model)
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    torch.manual_seed(0)
    ours = get_peft_model(copy.deepcopy(nf4_model), LoraConfig(**config))
    theirs = get_peft_model(reference, LoraConfig(**config))
    with torch.no_grad():  # non-zero B so both A and B receive gradient; same values on both sides
        for (name, p), (name2, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            if "lora_" in name:
                assert name == name2
                p.copy_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    ids = torch.randint(3, 32000, (2, 20), generator=torch.Generator().manual_seed(2))
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            rel = (grads[name] - p.grad).norm() / p.grad.norm()
            assert rel.item() <= 1e-3, (name, rel.item())


def test_backward_keeps_no_dense_copy_of_expert_weights(nf4_model):
    experts = nf4_model.model.layers[0].mlp.experts
    dense_shapes = {tuple(experts.gate_up_proj.quant_state.shape), tuple(experts.down_proj.quant_state.shape)}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(10, 64, requires_grad=True)
    idx = torch.randint(0, 4, (10, 2))
    weights = torch.rand(10, 2, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = experts(x, idx, weights)
    assert saved and not dense_shapes & set(saved)
    out.sum().backward()
    assert x.grad is not None and weights.grad is not None  # the router path gets its gradient too


def test_unquantized_experts_option(tiny_dir):
    model = load_model(str(tiny_dir), quantize_experts=False, device="cpu", compute_dtype="float32")
    experts = model.model.layers[0].mlp.experts
    assert not isinstance(experts, NF4Experts) and not is_4bit(experts.gate_up_proj)
    report = audit_model(model)
    assert report.ok
    assert any("quantize_experts: false" in note for note in report.notes)
    assert audit_model(model, quantize_experts=True).failures  # the same model fails a 4-bit audit


def test_quantize_then_load_round_trip(tiny_dir, nf4_model, tmp_path):
    from mixtral_ft.cli import main

    out = tmp_path / "nf4"
    assert main(["quantize", str(tiny_dir), str(out), "--device", "cpu"]) == 0
    assert (out / "mixtral_ft_nf4.json").exists()
    reloaded = load_model(str(out), device="cpu", compute_dtype="float32")
    for (name, a), (_, b) in zip(nf4_model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a.data, b.data), name  # the packed bytes come back as written, not re-quantized
    ids = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(nf4_model(ids).logits, reloaded(ids).logits)
    assert main(["quantize", str(tiny_dir), str(out), "--device", "cpu"]) == 2  # never overwrites


def test_quantize_bf16_experts_keeps_them_unquantized(tiny_dir, tmp_path):
    import json

    from mixtral_ft.cli import main

    out = tmp_path / "nf4_attn"
    assert main(["quantize", str(tiny_dir), str(out), "--bf16-experts", "--device", "cpu"]) == 0
    assert json.loads((out / "mixtral_ft_nf4.json").read_text())["quantize_experts"] is False
    model = load_model(str(out), device="cpu", compute_dtype="float32")
    layer = model.model.layers[0]
    assert not isinstance(layer.mlp.experts, NF4Experts) and not is_4bit(layer.mlp.experts.gate_up_proj)
    assert is_4bit(layer.self_attn.q_proj.weight)  # attention is NF4 all the same


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_quantize_device_is_obeyed_and_checked_before_the_load(tiny_dir, tmp_path, capsys):
    from mixtral_ft.cli import main

    assert main(["quantize", str(tiny_dir), str(tmp_path / "out"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device 'cuda': torch sees no CUDA GPU: ")
    assert err[0].endswith("; use cpu, or leave --device out")
    assert not (tmp_path / "out").exists()


def test_layers_split_across_shards_still_load(tmp_path, nf4_model):
    from mixtral_ft.model.shapes import tiny_config

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="300KB")  # the experts of a layer span shards
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    loaded = load_model(str(tmp_path), device="cpu", compute_dtype="float32")
    assert audit_model(loaded).ok


def test_incomplete_checkpoint_is_a_user_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from mixtral_ft.model.tiny import write_tiny

    folder = write_tiny(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="layer 1"):
        load_model(str(folder), device="cpu")


@pytest.mark.gpu
@requires_cuda
def test_cuda_bf16_matches_reference(tiny_dir):
    """Within twice the rounding noise of transformers' own bf16 run on the same weights (fp32 is the truth)."""
    model = load_model(str(tiny_dir), device="cuda", compute_dtype="bfloat16")
    truth_model = dequantized_reference(model).cuda()
    bf16_model = copy.deepcopy(truth_model).to(torch.bfloat16)
    ids = torch.randint(3, 32000, (2, 32), device="cuda")
    with torch.no_grad():
        ours, truth, noise = (m(ids).logits.float() for m in (model, truth_model, bf16_model))

    def error(logits):
        return ((logits - truth).norm() / truth.norm()).item()

    assert error(ours) <= 2 * error(noise) + 1e-3, (error(ours), error(noise))


@pytest.mark.slow
def test_load_memory_does_not_grow_with_depth_beyond_the_nf4_footprint(tmp_path):
    """Streaming load: twice the layers costs only their NF4 bytes, never the bf16 model.

    Materializing the bf16 checkpoint would add >= 120 MB between these two depths; streaming adds
    the extra layers' NF4 footprint (~27 MB). Constant start-up costs cancel in the difference.
    """
    import json
    import os
    import subprocess
    import sys

    from transformers import MixtralForCausalLM

    from mixtral_ft.model.shapes import mixtral_config

    probe = str(Path(__file__).parents[1] / "load_memory_probe.py")
    measured = {}
    for layers in (8, 16):
        config = mixtral_config(
            layers, hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2
        )
        torch.manual_seed(0)
        folder = tmp_path / f"L{layers}"
        MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="20MB")
        # A fixed mmap threshold and one arena make RSS follow live bytes instead of glibc's caching.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, probe, str(folder)], capture_output=True, text=True, check=True, env=env)
        measured[layers] = json.loads(out.stdout.strip().splitlines()[-1])
    layer_bf16 = 8 * 3 * 256 * 1024 * 2
    growth = measured[16]["peak_growth"] - measured[8]["peak_growth"]
    extra_final = measured[16]["final"] - measured[8]["final"]
    assert growth <= extra_final + 4 * layer_bf16, measured
