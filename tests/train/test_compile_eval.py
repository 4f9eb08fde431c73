"""train.compile with evaluation: compiled decoder layers also run eval (no_grad, eval mode) and report eval_loss.

It used to crash: on the first no_grad CPU forward, bitsandbytes' Linear4bit repacks its weight in place into a
bf16 CPU layout whenever it believes the CPU has avx512_bf16, and the graph compiled for the NF4 weight's shape
then failed its input checks. `cpu_bf16.keep_layout` stops the repacking; the run below forces bitsandbytes to
believe in bf16 (MIXTRAL_FT_CPU_BF16=1, in its own process since the forcing patches libraries process-wide),
so it would fail on any CPU if that ever came undone.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_RECIPE, requires_compile


@requires_compile
@pytest.mark.slow
def test_compiled_layers_evaluate_with_eval_steps_and_by_default(tmp_path):
    runs = {}
    for name, eval_steps in (("explicit", ["train.eval_steps=1"]), ("default", [])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "mixtral_ft.cli", "train", TINY_RECIPE, f"train.output_dir={out}"]
        cmd += ["train.compile=true", "model.compute_dtype=bfloat16", "train.max_steps=2", "train.save_steps=2"]
        env = os.environ | {"MIXTRAL_FT_CPU_BF16": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd + eval_steps, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((out / "run.json").read_text())["eval_losses"]
    assert [row["step"] for row in runs["explicit"]] == [1, 2]
    assert [row["step"] for row in runs["default"]] == [2]  # eval_steps null: at each checkpoint, compile or not
    # Same seed, same data: the step-2 evaluation is the same model in both runs.
    assert runs["default"][0]["eval_loss"] == pytest.approx(runs["explicit"][1]["eval_loss"], rel=1e-3)


@requires_compile
@pytest.mark.slow
def test_compile_outside_bf16_says_the_layers_run_eager_and_run_json_counts_it(tmp_path, capsys):
    from mixtral_ft.cli import main

    out = tmp_path / "fp32"
    argv = ["train", TINY_RECIPE, f"train.output_dir={out}", "train.compile=true", "model.compute_dtype=float32"]
    assert main([*argv, "train.max_steps=3", "data.test_size=0"]) == 0  # step 2: not a telemetry step
    assert "note: train.compile traces the layers whole in bfloat16 only; in float32" in capsys.readouterr().out
    report = json.loads((out / "run.json").read_text())["compile"]
    assert report["graph_breaks"] > 0, report


@requires_compile
@pytest.mark.slow
def test_dpo_with_evaluation_gets_a_graph_for_every_mode(tmp_path):
    """DPO compiles the most variants: policy and no-grad reference passes, training and evaluation, layer 0's
    input (embeddings made to require grad) and the rest, each at one length and then any. Past torch's default
    recompile limit of 8 the rest ran eager without a word; run.json now counts such hits, and there are none."""
    from mixtral_ft.cli import main

    out = tmp_path / "dpo"
    argv = ["train", str(ROOT / "recipes" / "tiny_dpo.yaml"), f"train.output_dir={out}", "train.compile=true"]
    argv += ["model.compute_dtype=bfloat16", "train.max_steps=4", "train.eval_steps=2", "train.save_steps=4"]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert [row["step"] for row in run["eval_losses"]] == [2, 4]
    assert run["compile"]["recompile_limit_hits"] == 0 and run["compile"]["graph_breaks"] == 0, run["compile"]
