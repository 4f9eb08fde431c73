"""`mixtral-ft tiny DIR`: --layout picks the checkpoint's tensor layout and --seed its random weights."""

from safetensors.torch import load_file

from mixtral_ft.cli import main


def tiny_weights(folder, *flags: str) -> dict:
    assert main(["tiny", str(folder), *flags]) == 0
    return load_file(str(folder / "model.safetensors"))


def test_layout_and_seed_flags(tmp_path):
    legacy = tiny_weights(tmp_path / "legacy")
    fused = tiny_weights(tmp_path / "fused", "--layout", "fused")
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in legacy  # the Hub's per-expert tensors
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused and not any("block_sparse_moe" in k for k in fused)
    again, other = tiny_weights(tmp_path / "seed0", "--seed", "0"), tiny_weights(tmp_path / "seed1", "--seed", "1")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert again[q].equal(legacy[q]) and not other[q].equal(legacy[q])  # seed 0 is the default
