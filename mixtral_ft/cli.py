"""`mixtral-ft COMMAND ...`: the flags and the dispatch; bad input is one line and exit 2, a full disk exit 74.

Each command is one plain function in commands.py.

    mixtral-ft train RECIPE [key=value ...]      fine-tune (SFT or DPO) as the recipe says
    mixtral-ft validate RECIPE [RECIPE ...]      check recipes without loading a model
    mixtral-ft data RECIPE [--show N] [--json]   the rows train would see (summary, examples); warms its cache
    mixtral-ft audit MODEL_OR_RECIPE [--json]    show what is 4-bit, what trains, what it weighs
    mixtral-ft tiny DIR                          write the built-in tiny random Mixtral
    mixtral-ft quantize MODEL OUT                write a pre-quantized NF4 copy of a model
    mixtral-ft merge ADAPTER --out DIR           fold a LoRA adapter into the (NF4-dequantized) base
    mixtral-ft push DIR --repo-id ORG/NAME       upload an adapter or merged model with a model card
    mixtral-ft chat MODEL [--prompt TEXT|--web]  talk to a model, adapter or merged model (REPL, one shot, browser)
    mixtral-ft eval OUTPUT_DIR_OR_RECIPE         held-out loss/perplexity (DPO: rewards), base vs adapter
    mixtral-ft plan RECIPE [--gpu-mem GiB]       predict peak GPU memory without loading the model
    mixtral-ft bench [--batch N ...]             throughput and memory of full-width Mixtral in NF4
"""

from __future__ import annotations

import argparse
import os
import sys

from mixtral_ft import commands
from mixtral_ft.errors import EXIT_IO, OneLineParser, UserError, io_failure
from mixtral_ft.parsers import add_force_flag, chat_parser, eval_parser, merge_parser, push_parser
from mixtral_ft.quiet import quiet_third_party


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune as a recipe says")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    p.add_argument(
        "overrides", nargs="*", default=[], help="dotted.key=value overrides, e.g. lora.r=8 train.max_steps=5"
    )
    p.add_argument("--num-processes", type=int, metavar="N", help="processes (GPUs) via accelerate (default: 1)")
    p.add_argument("--accelerate-config", metavar="PATH", help="e.g. accelerate_configs/fsdp_qlora.yaml")
    add_force_flag(p, "train", "no CUDA GPU, or plan: no fit")
    p.set_defaults(func=commands.cmd_train)


def _validate_parser(sub) -> None:
    p = sub.add_parser("validate", help="check recipes without loading a model")
    p.add_argument("recipes", nargs="+", help="YAML recipes")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every recipe (repeatable)",
    )
    p.set_defaults(func=commands.cmd_validate)


def _data_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="prepare the recipe's data as train does, without a model: summary and example rows; warms the cache",
        description="Tokenizes the recipe's data exactly as `train` does (no model is loaded) and prints the data "
        "lines, a summary and example rows with the trained tokens marked (green on a terminal, ⟦…⟧ otherwise). "
        "The tokenized rows land in datasets' cache (HF_DATASETS_CACHE), which `train` with the same data and "
        "length settings then reads instead of tokenizing again.",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="dotted.key=value overrides, e.g. train.max_length=512")
    p.add_argument(
        "--show", type=int, default=1, metavar="N", help="example train rows to render (default: 1; 0: none)"
    )
    p.add_argument("--json", action="store_true", help="print JSON: reports, summary, the shown rows' ids and mask")
    p.set_defaults(func=commands.cmd_data)


def _audit_parser(sub) -> None:
    p = sub.add_parser("audit", help="show what is 4-bit, what trains, what it weighs; exit 1 on failure")
    p.add_argument("model_or_recipe", help="model (tiny, folder, hub id) or a recipe (with its LoRA)")
    p.add_argument("overrides", nargs="*", default=[], help="recipe overrides, key=value")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--bf16-experts", action="store_true", help="load experts in bf16 (quantize_experts: false)")
    p.set_defaults(func=commands.cmd_audit)


def _tiny_parser(sub) -> None:
    p = sub.add_parser("tiny", help="write the built-in tiny random Mixtral and tokenizer")
    p.add_argument("dir", help="output folder (new or empty)")
    p.add_argument(
        "--layout",
        choices=["legacy", "fused"],
        default="legacy",
        help="legacy: the Hub's per-expert tensors; fused: transformers 5 3-D experts",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.set_defaults(func=commands.cmd_tiny)


def _quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write a pre-quantized NF4 copy (~24 GB for Mixtral instead of 93)")
    p.add_argument("model", help="model to quantize: tiny, a folder, or a hub id")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda if available, else cpu)")
    p.add_argument("--bf16-experts", action="store_true", help="keep experts in bf16")
    p.set_defaults(func=commands.cmd_quantize)


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="predict peak GPU memory for a recipe without loading the model; exit 1 if it does not fit"
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/oasst.yaml")
    p.add_argument(
        "overrides", nargs="*", default=[], help="dotted.key=value overrides, e.g. train.per_device_train_batch_size=8"
    )
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB", help="memory of one GPU (default: 80)")
    p.add_argument("--num-gpus", type=int, default=1, metavar="N", help="GPUs the run is spread over (DDP; default: 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=commands.cmd_plan)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput and memory of full-width Mixtral in NF4 (see --help)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of mixtral_ft.bench")
    p.set_defaults(func=commands.cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    from mixtral_ft import __version__

    parser = OneLineParser(prog="mixtral-ft", description="QLoRA fine-tuning of Mixtral-8x7B.")
    parser.add_argument("--version", action="version", version=f"mixtral-ft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _train_parser,
        _validate_parser,
        _data_parser,
        _audit_parser,
        _tiny_parser,
        _quantize_parser,
        merge_parser,
        push_parser,
        chat_parser,
        eval_parser,
        _plan_parser,
        _bench_parser,
    ):
        add(sub)
    parser.set_defaults(command_names=tuple(sub.choices))  # public read-back for the did-you-mean below
    return parser


def unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """A one-line did-you-mean for a mistyped command (argparse only lists every choice), or None."""
    import difflib

    if not argv or argv[0].startswith("-"):
        return None
    commands = parser.get_default("command_names")
    if argv[0] in commands:
        return None
    close = difflib.get_close_matches(argv[0], commands, n=1, cutoff=0.5)
    hint = f"did you mean `mixtral-ft {' '.join([close[0], *argv[1:]])}`?" if close else "see `mixtral-ft --help`"
    return f"unknown command '{argv[0]}'; {hint} (commands: {', '.join(commands)})"


def parse(argv: list[str]) -> argparse.Namespace:
    """The command's arguments; a mistyped command or a bad flag is a UserError (one line, exit 2)."""
    if argv[:1] == ["bench"]:  # its own parser owns every option after the command
        return argparse.Namespace(func=commands.cmd_bench, bench_args=argv[1:])
    parser = build_parser()
    unknown = unknown_command(parser, argv)
    if unknown:
        raise UserError(unknown)
    # argparse stops a `nargs="*"` positional at the first flag, so `train R --num-processes 2 k=v` would
    # leave `k=v` unrecognized: key=value leftovers are overrides too, in the order given.
    args, extra = parser.parse_known_args(argv)
    if extra and (getattr(args, "overrides", None) is None or any(e.startswith("-") or "=" not in e for e in extra)):
        raise UserError(f"unrecognized arguments: {' '.join(extra)}: see `mixtral-ft {args.command} --help`")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        quiet_third_party()  # before the commands import the libraries: stderr is ours (errors, progress)
        code = args.func(args)
        sys.stdout.flush()  # a reader gone (`| head`) fails here, inside the try, not in the exit-time flush
        return code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mixtral-ft audit tiny --json | head`: the reader left; as a shell tool, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit-time flush fails once more
        return 128 + 13  # SIGPIPE's status
    except Exception as exc:  # a full disk under merge, quantize, eval or a download: one line, exit 74
        found = io_failure(exc)
        if found is None:
            raise
        cause, path = found
        where = f" at '{path}'" if path else ""
        print(
            f"error: storage failure{where}: {cause}. Free space (or fix the mount or permissions) and run the "
            "same command again",
            file=sys.stderr,
        )
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
