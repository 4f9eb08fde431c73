"""The CLI's habits: --version, did-you-mean, the GPU pre-check before any download, plan's offline look-up, marks."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import torch

from mixtral_ft import __version__
from mixtral_ft.cli import main
from mixtral_ft.common import why_no_cuda
from mixtral_ft.errors import UserError
from mixtral_ft.plan.fit_check import check_can_train, verdict
from mixtral_ft.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
OASST = str(ROOT / "recipes" / "oasst.yaml")
TINY = str(ROOT / "recipes" / "tiny.yaml")


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mixtral-ft {__version__}"


def _options(parser) -> list:
    import argparse

    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_flag_and_argument_says_what_it_does():
    """`mixtral-ft COMMAND --help` (bench's too) has a line for every flag, and a plain default it shows is the
    one the flag really has."""
    import argparse
    import re

    from mixtral_ft.bench.args import build_parser as bench_parser
    from mixtral_ft.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    parsers = {**commands, "bench (its own parser)": bench_parser()}
    for name, parser in parsers.items():
        for action in _options(parser):
            if isinstance(action, argparse._VersionAction):
                continue
            label = f"mixtral-ft {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{label} has no help"
            said = re.search(r"\(default: ([\w.]+)\)", action.help)  # a plain value, not "cuda if available"
            if said and action.default is not None and not isinstance(action.default, bool):
                default = action.default[0] if isinstance(action.default, list) else action.default
                assert said.group(1) in (str(default), f"{default:g}" if isinstance(default, float) else ""), label


def test_mistyped_command_suggests_the_right_one(capsys):
    assert main(["trian", "recipes/tiny.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: unknown command 'trian'; did you mean `mixtral-ft train recipes/tiny.yaml`? (commands: "
        "train, validate, data, audit, tiny, quantize, merge, push, chat, eval, plan, bench)"
    )
    assert main(["xyzzy"]) == 2 and "see `mixtral-ft --help`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", TINY, "--bogus"], "unrecognized arguments: --bogus: see `mixtral-ft train --help`"),
        (["plan"], "the following arguments are required: recipe"),
        (["merge", "runs/x"], "the following arguments are required: --out"),
        (["tiny", "/tmp/x", "--layout", "flat"], "argument --layout: invalid choice: 'flat'"),
        (["plan", TINY, "--gpu-mem", "lots"], "argument --gpu-mem: invalid float value: 'lots'"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(capsys, argv, expected):
    # argparse's own error prints the usage too; every other bad input is one line (README: stderr).
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("error: ") and expected in captured.err


# --- GPU pre-check -----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_full_mixtral_without_gpu_stops_before_any_download(tmp_path, capsys):
    out = tmp_path / "runs" / "oasst"
    assert main(["train", OASST, f"train.output_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "stopped before any download" in err[0]
    assert "recipes/tiny.yaml" in err[0] and "mixtral-ft plan" in err[0] and "--force" in err[0]
    assert f"torch sees none: {why_no_cuda()};" in err[0]  # and says why (CPU build, driver, container…)
    assert not (tmp_path / "runs").exists()  # no empty output folder left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_the_launching_command_checks_once_before_starting_workers(tmp_path, capsys):
    # Before, only single-process runs were checked: N workers each started loading the full model on CPU.
    out = tmp_path / "runs" / "oasst"
    assert main(["train", OASST, f"train.output_dir={out}", "--num-processes", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "stopped before any download" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
@pytest.mark.parametrize("extra", [["--force"], ["train.check_fit=false"]])
def test_force_or_the_recipe_key_skip_the_check(tmp_path, capsys, extra):
    # Past the check, the offline download is what fails (HF_HUB_OFFLINE, conftest): proof the check was skipped.
    assert main(["train", OASST, f"train.output_dir={tmp_path / 'run'}", *extra]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" not in err and "could not fetch model" in err


def test_plan_verdicts_for_a_gpu():
    recipe = load_recipe(OASST)
    small = verdict(recipe, "recipes/oasst.yaml", 24.0)
    assert "does not fit this GPU" in small and "mixtral-ft plan recipes/oasst.yaml --gpu-mem 24" in small
    assert verdict(recipe, "recipes/oasst.yaml", 141.0) is None  # an H200
    assert "needs a CUDA GPU" in verdict(recipe, "recipes/oasst.yaml", None)
    # FSDP / ZeRO-3 split the weights: the per-GPU share is plan --num-gpus's to judge, not the whole model's.
    assert verdict(recipe, "recipes/oasst.yaml", 24.0, sharded=True) is None
    assert "needs a CUDA GPU" in verdict(recipe, "recipes/oasst.yaml", None, sharded=True)


def test_the_tiny_recipe_hint_works_from_any_folder(tmp_path, monkeypatch):
    from mixtral_ft.plan.fit_check import tiny_recipe

    monkeypatch.chdir(ROOT)
    assert tiny_recipe() == "recipes/tiny.yaml"
    monkeypatch.chdir(tmp_path)
    assert Path(tiny_recipe()).is_file() and Path(tiny_recipe()).is_absolute()


def test_small_models_pass_on_cpu(tiny_dir):
    assert verdict(load_recipe(TINY), "recipes/tiny.yaml", None) is None
    assert verdict(load_recipe(TINY, [f"model.name={tiny_dir}"]), "r.yaml", None) is None
    check_can_train(load_recipe(TINY), TINY)  # no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "mistralai/Mixtral-8x7B-Instruct-v0.1", "--prompt", "hi"],
        ["chat", "mistralai/Mixtral-8x7B-Instruct-v0.1", "--no-quantize", "--prompt", "hi"],
        ["eval", OASST],
    ],
)
def test_chat_and_eval_of_full_mixtral_without_gpu_stop_before_any_download(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "torch sees no CUDA GPU" in err[0] and "stopped before any download" in err[0]
    assert f"--force to {argv[0]} anyway" in err[0]
    assert ("87.0 GiB (bf16)" if "--no-quantize" in argv else "22.8 GiB (NF4)") in err[0]
    # Past the check, the offline download is what fails (HF_HUB_OFFLINE, conftest): proof --force skips it.
    assert main([*argv, "--force"]) == 2
    err = capsys.readouterr().err
    assert "torch sees no CUDA GPU" not in err and "could not fetch" in err


def test_serve_verdicts(tiny_dir):
    from mixtral_ft.plan.fit_check import serve_verdict

    full = "mistralai/Mixtral-8x7B-v0.1"
    assert "more than this 16 GiB GPU holds" in serve_verdict(full, None, 16.0, command="chat", quantize=True)
    assert serve_verdict(full, None, 24.0, command="eval", quantize=True) is None  # 22.8 GiB in NF4
    assert serve_verdict(full, None, 16.0, command="chat", quantize=False) is None  # device_map spills to CPU
    assert "87.0 GiB (bf16)" in serve_verdict(full, None, None, command="chat", quantize=False)
    bf16_experts = serve_verdict(full, None, None, command="chat", quantize=True, quantize_experts=False)
    assert "GiB (NF4, experts bf16)" in bf16_experts
    for small in ("tiny", str(tiny_dir)):
        assert serve_verdict(small, None, None, command="chat", quantize=False) is None


def test_inference_weights_count_every_parameter(tiny_dir):
    """--no-quantize's size is the bf16 model's: every parameter a transformers Mixtral has, two bytes each."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mixtral_ft.model.shapes import mixtral_config
    from mixtral_ft.plan.fit_check import inference_weights_gib
    from mixtral_ft.plan.inputs import Dims

    config = AutoConfig.from_pretrained(tiny_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert inference_weights_gib(Dims.of(config), quantize=False) * 2**30 == 2 * params
    mixtral = Dims.of(mixtral_config(32))
    nf4, bf16 = (inference_weights_gib(mixtral, quantize=q) for q in (True, False))
    assert 0.25 < nf4 / bf16 < 0.27  # ~half a byte a weight, the embeddings and the head in bf16


def test_launched_workers_skip_the_check(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_can_train(load_recipe(OASST), OASST)
    monkeypatch.setenv("WORLD_SIZE", "1")
    if not torch.cuda.is_available():
        with pytest.raises(UserError):
            check_can_train(load_recipe(OASST), OASST)


# --- plan ----------------------------------------------------------------------------------------


class CountingHub(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        CountingHub.requests.append(self.path)
        self.send_response(503)
        self.end_headers()

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    CountingHub.requests = []
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield CountingHub.requests
    server.shutdown()


def test_plan_tries_the_hub_once_then_uses_the_builtin_shape(hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["plan", OASST, "--gpu-mem", "80"]) == 0
    assert len(hub) == 1 and hub[0].endswith("/config.json")  # huggingface_hub itself would retry a 503 5 times
    out = capsys.readouterr()
    assert out.out.count("could not be fetched (HTTP 503): used the built-in Mixtral-8x7B shape") == 1
    assert "one try" in out.err


def test_plan_offline_makes_no_request(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", OASST]) == 0
    assert hub == [] and capsys.readouterr().out.count("HF_HUB_OFFLINE is set") == 1


def test_plan_marks_each_suggestion(capsys):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert main(["plan", OASST, "--gpu-mem", "24"]) == 1
    finally:
        monkeypatch.undo()
    advice = [line for line in capsys.readouterr().out.splitlines() if line.startswith("advice: train.")]
    assert advice and all(line.endswith(("(fits)", "(does not fit)")) for line in advice)
    assert any(line.endswith("(does not fit)") for line in advice)


def test_a_closed_pipe_on_stdout_is_no_traceback():
    """`mixtral-ft validate ... | head -0`: the reader is gone before the command writes."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "mixtral_ft.cli", "validate", TINY]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize("command", ["train", "audit", "plan"])
def test_a_missing_recipe_is_named_alone(command, capsys):
    """argparse listed the optional overrides as required too: "required: recipe, overrides"."""
    assert main([command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "are required: " in err[0] and "overrides" not in err[0], err
