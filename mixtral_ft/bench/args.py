"""`mixtral-ft bench`'s options: the model, the batches, the output folder and the speed levers.

benchmarks/compare.py adds the peers' options to the same parser. Bad options are one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mixtral_ft.common import why_no_cuda
from mixtral_ft.errors import OneLineParser, UserError
from mixtral_ft.model.device import check_device
from mixtral_ft.model.grouped_gemm import compile_problem

if TYPE_CHECKING:
    from transformers import MixtralConfig

OUT_DIR = Path("bench-results")  # relative: under the current folder, never next to the installed package
# --layers and --seq when not given: Mixtral-8x7B's depth at 2048 tokens; the tiny model's depth at a length a
# CPU steps through in seconds. Explicit values are always measured as given.
FULL_DEFAULTS = {"layers": 32, "seq": 2048}
TINY_DEFAULTS = {"layers": 2, "seq": 256}
DESCRIPTION = "Throughput and memory of full-width Mixtral built straight into NF4 (our model; peers: benchmarks/)."


class _Parser(OneLineParser):
    def error(self, message):
        hint = " (the peers are measured by python benchmarks/compare.py)" if "--peer-" in message else ""
        super().error(f"{message}{hint}")


def build_parser(prog: str = "mixtral-ft bench", description: str | None = None) -> argparse.ArgumentParser:
    """Our options; benchmarks/compare.py adds the peers' to the same parser."""
    parser = _Parser(prog=prog, description=description or DESCRIPTION)
    # None: the model's default (FULL or TINY below), filled in by check_args once --tiny is known
    parser.add_argument("--layers", type=int, help="decoder layers (default: 32, with --tiny 2)")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[2], help="micro-batch sizes, one measurement each (default: 2)"
    )
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: 2048, with --tiny 256)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda if available, else cpu)",
    )
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny model (CPU smoke mode)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=OUT_DIR,
        metavar="DIR",
        help="folder for the result file, created if needed (default: ./bench-results)",
    )
    parser.add_argument("--tag", help="suffix of the result file's name, e.g. the lever measured")
    parser.add_argument("--profile", action="store_true", help="also write each batch's torch.profiler op table")
    lever = parser.add_argument_group("speed levers (benchmarks/NOTES.md)")
    lever.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations (no recompute)")
    lever.add_argument(
        "--skip-checkpoint-layers",
        type=int,
        default=0,
        metavar="N",
        help="keep the last N layers' activations instead of recomputing them",
    )
    lever.add_argument(
        "--experts",
        choices=["grouped", "loop"],
        default="grouped",
        help="grouped: one F.grouped_mm per projection over all experts (default; the loop where a startup check "
        "finds torch's wrong here); loop: one matmul per expert",
    )
    lever.add_argument(
        "--reuse-dequantized",
        action="store_true",
        help="backward reuses the recompute's dequantized experts (2 dequantizations a step, not 3)",
    )
    lever.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0)")
    lever.add_argument("--liger", action="store_true", help="liger-kernel RMSNorm, RoPE and fused linear cross-entropy")
    lever.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    return parser


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --layers/--seq defaults, reject bad options with a UserError (one line, exit 2), gather the levers."""
    for name, default in (TINY_DEFAULTS if args.tiny else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    _check_numbers(args)
    check_device(args.device)  # a typo or a missing GPU: one line now, not a traceback once the run starts
    _check_context(args)
    _check_levers(args)
    _check_cpu_size(args)
    if args.liger and not args.device.startswith("cuda"):
        raise UserError("--liger runs Triton kernels and needs a CUDA GPU: drop --liger on CPU")
    if args.liger and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("--liger needs liger-kernel: pip install liger-kernel")
    if args.compile and (problem := compile_problem("--compile", "drop --compile")):
        raise UserError(problem)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise UserError(f"--out-dir {args.out_dir} is a file, not a folder: pass a folder for the result files")
    args.levers = {
        "checkpointing": not args.no_checkpointing,
        "skip_layers": args.skip_checkpoint_layers,
        "experts": args.experts,
        "reuse_dequantized": args.reuse_dequantized,
        "lora_dropout": args.lora_dropout,
        "liger": args.liger,
        "compile": args.compile,
    }
    return args


def model_config(tiny: bool, layers: int) -> MixtralConfig:
    """The config a run measures: full-width Mixtral, or the tiny one with --tiny, `layers` deep either way."""
    from mixtral_ft.model.shapes import mixtral_config, tiny_config

    return tiny_config(num_hidden_layers=layers) if tiny else mixtral_config(layers)


def _check_context(args: argparse.Namespace) -> None:
    # Past max_position_embeddings the rotary positions run on, but no Mixtral was trained there: a figure for a
    # context the model does not have.
    limit = model_config(args.tiny, 1).max_position_embeddings
    if args.seq > limit:
        model = "the tiny model's" if args.tiny else "Mixtral-8x7B's"
        raise UserError(
            f"--seq {args.seq} is past {model} context (max_position_embeddings {limit}): pass --seq {limit} or less"
        )


def _check_levers(args: argparse.Namespace) -> None:
    if not 0 <= args.skip_checkpoint_layers <= args.layers:
        raise UserError(f"--skip-checkpoint-layers must be between 0 and --layers ({args.layers})")
    # As train.reuse_dequantized / skip_checkpoint_layers: without checkpointing there is no recompute to act on,
    # and the result file would name a lever that was not measured.
    for flag, on in (
        ("--reuse-dequantized", args.reuse_dequantized),
        ("--skip-checkpoint-layers", args.skip_checkpoint_layers),
    ):
        if on and args.no_checkpointing:
            raise UserError(f"{flag} acts on checkpointed layers only: drop it or --no-checkpointing")


def _check_cpu_size(args: argparse.Namespace) -> None:
    """A run that plan says needs more than a CPU has (full-width Mixtral, the default on a machine without CUDA,
    or a tiny one at a huge batch or length) would run for hours or be OOM-killed: refused before it starts."""
    if not args.device.startswith("cpu"):
        return
    from mixtral_ft.plan.fit_check import CPU_LIMIT_GIB
    from mixtral_ft.plan.peak import Dims, Run, estimate

    run = Run(max(args.batch), args.seq, dtype_bytes=4, checkpointing=not args.no_checkpointing, loop="plain")
    need = estimate(Dims.of(model_config(args.tiny, args.layers)), run).peak / 2**30
    if need <= CPU_LIMIT_GIB:
        return
    if args.tiny:
        raise UserError(
            f"the tiny model at --layers {args.layers} --batch {max(args.batch)} --seq {args.seq} needs about "
            f"{need:.0f} GiB (plan) on the CPU here, over {CPU_LIMIT_GIB:.0f}: lower --batch, --seq or --layers"
        )
    unseen = "" if torch.cuda.is_available() else f" (torch sees no CUDA GPU: {why_no_cuda()})"
    raise UserError(
        f"full-width Mixtral at --layers {args.layers} needs about {need:.0f} GiB (plan) and runs on the CPU "
        f"here{unseen}: add --tiny for a CPU smoke run, or run it on a CUDA GPU (--device cuda)"
    )


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("layers", "batch", "seq", "steps"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.seq < 2:  # one token has no next token to predict: the loss is NaN, and JSON has no NaN
        raise UserError("--seq must be at least 2 (a causal LM needs a next token to score)")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more (untimed steps before the timed ones)")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError("--lora-dropout must be in [0, 1), e.g. 0.05")
    if args.tag is not None and not re.fullmatch(r"[\w+-][\w.+-]*", args.tag):
        raise UserError(f"--tag '{args.tag}' becomes part of a file name: use letters, digits, '-' or '_'")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return check_args(build_parser().parse_args(argv))
