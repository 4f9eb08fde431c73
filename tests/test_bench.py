"""The benchmark's CPU smoke mode, as CI runs it: it builds the model in NF4 and writes a result file."""

import json

import pytest

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
