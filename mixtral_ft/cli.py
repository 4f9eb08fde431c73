"""`mixtral-ft COMMAND ...`: each command is one plain function; bad input is one line and exit 2.

    mixtral-ft train RECIPE [key=value ...]      fine-tune (SFT) as the recipe says
    mixtral-ft validate RECIPE [RECIPE ...]      check recipes without loading a model
    mixtral-ft audit MODEL_OR_RECIPE [--json]    show what is 4-bit, what trains, what it weighs
    mixtral-ft tiny DIR                          write the built-in tiny random Mixtral
    mixtral-ft quantize MODEL OUT                write a pre-quantized NF4 copy of a model
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from mixtral_ft.errors import UserError


def cmd_train(args) -> int:
    from mixtral_ft.recipe import load_recipe
    from mixtral_ft.train import train

    train(load_recipe(args.recipe, args.overrides))
    return 0


def cmd_validate(args) -> int:
    from mixtral_ft.recipe import load_recipe

    failed = 0
    for path in args.recipes:
        try:
            load_recipe(path, args.overrides)
            print(f"ok: {path}")
        except UserError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def cmd_audit(args) -> int:
    from mixtral_ft.audit import audit_model
    from mixtral_ft.model import apply_lora, load_model

    target = args.model_or_recipe
    if target.endswith((".yaml", ".yml")):
        from mixtral_ft.recipe import load_recipe

        recipe = load_recipe(target, args.overrides)
        model = load_model(recipe.model.name, quantize_experts=recipe.model.quantize_experts,
                           compute_dtype=recipe.model.compute_dtype, revision=recipe.model.revision)
        model = apply_lora(model, recipe.lora, adapter=recipe.model.adapter)
    else:
        if args.overrides:
            raise UserError("key=value overrides apply to recipes only: pass a recipe, or drop them")
        model = load_model(target, quantize_experts=not args.bf16_experts)
    report = audit_model(model)
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1


def cmd_tiny(args) -> int:
    from mixtral_ft.tiny import write_tiny

    out = Path(args.dir)
    _refuse_nonempty(out, "DIR")
    write_tiny(out, layout=args.layout, seed=args.seed)
    print(f"wrote tiny Mixtral ({args.layout} layout) and the Mixtral tokenizer to {out}")
    return 0


def cmd_quantize(args) -> int:
    from transformers import AutoConfig, GenerationConfig

    from mixtral_ft.loader import save_prequantized
    from mixtral_ft.model import load_model, resolve_model_path
    from mixtral_ft.tokenizer import load_tokenizer, save_tokenizer

    out = Path(args.out)
    _refuse_nonempty(out, "OUT")
    source = resolve_model_path(args.model)
    model = load_model(str(source), quantize_experts=not args.bf16_experts, device=args.device)
    # Write into a sibling staging folder and rename at the end: an interrupted run leaves no half model.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_prequantized(model, staging, source=args.model)
        AutoConfig.from_pretrained(source).save_pretrained(staging)
        if (source / "generation_config.json").exists():
            GenerationConfig.from_pretrained(source).save_pretrained(staging)
        save_tokenizer(load_tokenizer(source), staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
    print(f"wrote pre-quantized NF4 model to {out} ({size:.2f} GiB); use it as model.name")
    return 0


def _refuse_nonempty(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{what} '{path}' already exists and is not empty: choose a new folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral-ft", description="QLoRA fine-tuning of Mixtral-8x7B.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune as a recipe says")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. lora.r=8 train.max_steps=5")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check recipes without loading a model")
    p.add_argument("recipes", nargs="+", help="YAML recipes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every recipe (repeatable)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("audit", help="show what is 4-bit, what trains, what it weighs; exit 1 on failure")
    p.add_argument("model_or_recipe", help="model (tiny, folder, hub id) or a recipe (with its LoRA)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--bf16-experts", action="store_true", help="load experts in bf16 (quantize_experts: false)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("tiny", help="write the built-in tiny random Mixtral and tokenizer")
    p.add_argument("dir", help="output folder (new or empty)")
    p.add_argument("--layout", choices=["legacy", "fused"], default="legacy",
                   help="legacy: the Hub's per-expert tensors; fused: transformers 5 3-D experts")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("quantize", help="write a pre-quantized NF4 copy (~24 GB for Mixtral instead of 93)")
    p.add_argument("model", help="model to quantize: tiny, a folder, or a hub id")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda if available, else cpu)")
    p.add_argument("--bf16-experts", action="store_true", help="keep experts in bf16")
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Upstream deprecation chatter (e.g. peft calling is_gradient_checkpointing) is not the user's to fix.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
