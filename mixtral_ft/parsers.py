"""The flags of the commands that work on a trained result (merge, push, chat, eval), and the flag helpers they
share with `train`: cli.py builds the other parsers and dispatches.
"""

from __future__ import annotations

import argparse

from mixtral_ft import commands


def add_force_flag(p, command: str, too_big: str = "no CUDA GPU, or too little GPU memory") -> None:
    help_ = f"{command} even if the model looks too big for this machine ({too_big})"
    p.add_argument("--force", action="store_true", help=help_)


def _add_attn_flag(p) -> None:
    p.add_argument(
        "--attn-implementation",
        default=None,
        choices=["sdpa", "flash_attention_2", "eager"],
        help="attention kernel (default: the run's model.attn_implementation, else sdpa)",
    )


def _add_generation_flags(p, max_new_tokens: int, temperature: float, sampling_note: str) -> None:
    # Defaults are None so that commands._generation can tell a flag given from one left out.
    p.add_argument("--max-new-tokens", type=int, help=f"tokens per reply (default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, help=f"sampling temperature; 0 is greedy (default: {temperature:g})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling threshold (default: 0.95); {sampling_note}")
    p.add_argument("--seed", type=int, help=f"seed for reproducible sampling; {sampling_note}")
    p.set_defaults(generation_defaults={"max_new_tokens": max_new_tokens, "temperature": temperature})


def merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into the base weights (streamed, shard by shard)")
    p.add_argument("adapter", help="adapter folder (a training output_dir)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument(
        "--base-weights",
        choices=["dequantized", "original"],
        default="dequantized",
        help="dequantized: the NF4 weights the adapter was trained against (default); "
        "original: the checkpoint's bf16 weights",
    )
    p.add_argument("--base", default=None, help="base model (default: the one the adapter was trained on)")
    dtypes = ["auto", "bfloat16", "float16", "float32"]
    p.add_argument(
        "--dtype", choices=dtypes, default="auto", help="dtype of the written weights (auto: the checkpoint's)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare with the adapter on the base it was merged into, on held-out rows; writes verify.json",
    )
    p.add_argument("--device", default=None, help="--verify only: its device (default: cuda if available, else cpu)")
    p.set_defaults(func=commands.cmd_merge)


def push_parser(sub) -> None:
    p = sub.add_parser("push", help="upload an adapter or merged model folder to the Hub, with a model card")
    p.add_argument("dir", help="adapter folder or merged model folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    visibility = "a repo this push creates is private (default) or public (--no-private); an existing one keeps its own"
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=True, help=visibility)
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; needs no token")
    p.set_defaults(func=commands.cmd_push)


def chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model, an adapter on its NF4 base, or a merged model")
    p.add_argument("model", help="tiny, a model folder, a hub id, or a training output_dir (adapter + its base)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder to put on MODEL")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    p.add_argument("--system", default=None, help="system prompt, folded into the first user turn")
    p.add_argument(
        "--no-quantize",
        action="store_true",
        help="load a plain transformers model (e.g. a merged folder) instead of the NF4 one",
    )
    _add_generation_flags(p, 256, 0.7, "sampling only: refused with --temperature 0, but not with --web")
    _add_attn_flag(p)
    p.add_argument("--web", action="store_true", help="serve a browser chat UI (gradio: pip install -e '.[web]')")
    p.add_argument("--host", help="--web only: address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="--web only: port to listen on (default: 7860)")
    add_force_flag(p, "chat")
    p.set_defaults(func=commands.cmd_chat)


def eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss and perplexity (DPO: preference accuracy and rewards), base vs adapter, "
        "with sample generations",
    )
    p.add_argument("target", metavar="OUTPUT_DIR_OR_RECIPE", help="training output_dir or a recipe")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the output_dir's own)")
    p.add_argument(
        "--data",
        default=None,
        help="evaluate on all of these rows (a file, a dataset folder or hub id: its train split; or a builtin) "
        "instead of the recipe's held-out split: conversations for loss, preference pairs for DPO rewards",
    )
    p.add_argument(
        "--samples", type=int, default=3, help="sample generations to write to eval.json (0: none, no generation flags)"
    )
    p.add_argument("--max-rows", type=int, default=None, help="score at most this many held-out rows")
    p.add_argument("--out", default=None, help="report path (default: OUTPUT_DIR/eval.json)")
    _add_generation_flags(p, 128, 0.0, "sampling only: needs --temperature > 0")
    _add_attn_flag(p)
    add_force_flag(p, "eval")
    p.set_defaults(func=commands.cmd_eval)
