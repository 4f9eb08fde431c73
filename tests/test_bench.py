"""The benchmark's CPU smoke mode, as CI runs it: it builds the model in NF4 and writes a result file."""

import json

import pytest
import torch

from mixtral_ft.cli import main


@pytest.mark.slow
def test_bench_smoke_writes_a_result(tmp_path):
    assert main(["bench", "--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1",
                 "--seq", "64", "--out-dir", str(tmp_path)]) == 0
    [result_file] = tmp_path.glob("*.json")
    result = json.loads(result_file.read_text())
    for key in ("date", "device", "versions", "layers", "batch", "seq", "tok_per_s", "peak_gib", "hfu"):
        assert key in result
    assert result["tok_per_s"] > 0 and result["layers"] == 2 and result["device"] == "cpu"


def test_step_flops_scale_with_depth_and_recompute():
    from mixtral_ft.bench import mixtral_config, step_flops

    one, two = step_flops(mixtral_config(1), 4096, 2048, True), step_flops(mixtral_config(2), 4096, 2048, True)
    assert two > one
    assert step_flops(mixtral_config(32), 4096, 2048, False) / step_flops(mixtral_config(32), 4096, 2048, True) \
        == pytest.approx(2 / 3)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_depth_qlora_step_fits_30_gib(tmp_path):
    """Issue 3: 32 full-width layers built in NF4, one QLoRA step at B2 x S2048, peak <= 30 GiB."""
    from mixtral_ft.bench import run_benchmark

    result = run_benchmark(layers=32, batch=2, seq=2048, steps=1, warmup=1, device=torch.device("cuda"),
                           tiny=False)
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert result["peak_gib"] <= 30, result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_peak_is_final_footprint_plus_one_layer(tmp_path):
    """Issue 3: loading never holds more than the NF4 model plus one layer of bf16 experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from mixtral_ft.model import load_model

    config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, tie_word_embeddings=False)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="200MB")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    load_model(str(tmp_path), device="cuda", compute_dtype="bfloat16")
    final = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    one_layer_bf16 = 8 * 3 * 1024 * 3584 * 2
    assert peak <= final + one_layer_bf16 * 1.05, (peak, final)
