"""What each `mixtral-ft` command does: one plain function per command, given argparse's namespace.

The flags and the dispatch are cli.py's. Each command imports what it needs when it runs, not here, so
`mixtral-ft --help` and `validate` answer without importing torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mixtral_ft.errors import UserError


def _pick(args, *names: str) -> dict:
    """The flags a command hands on by the same name."""
    return {name: getattr(args, name) for name in names}


def cmd_train(args) -> int:
    from mixtral_ft.errors import EXIT_IO
    from mixtral_ft.plan.fit_check import check_can_train
    from mixtral_ft.recipe import load_recipe
    from mixtral_ft.train.fsio import io_message
    from mixtral_ft.train.outdir import claimed
    from mixtral_ft.train.precheck import precheck

    recipe = load_recipe(args.recipe, args.overrides)
    precheck(recipe)  # data files, adapter folder: fast, before torch and transformers load
    from mixtral_ft.distributed import launch, needs_launcher, shards_weights

    force = getattr(args, "force", False)
    if needs_launcher(args.num_processes, args.accelerate_config):  # N > 1 or a config: accelerate launches
        from torch.distributed.elastic.multiprocessing.api import SignalException

        from mixtral_ft.train.run import check_output_dir

        check_can_train(recipe, args.recipe, force=force, sharded=shards_weights(args.accelerate_config))
        try:
            check_output_dir(recipe)  # once here, not in every worker after N model loads
            return launch(args.recipe, args.overrides, args.num_processes, args.accelerate_config)
        except SignalException as exc:  # the launcher got it too; it passed it on and waited for the workers,
            return 128 + int(exc.sigval)  # which saved a checkpoint and said so: 143 / 130, no traceback
    check_can_train(recipe, args.recipe, force=force)  # before any download or folder
    try:
        with claimed(recipe.train.output_dir):  # one run per folder (rank 0 locks); a failed run leaves no empty one
            return _train(recipe)
    except Exception as exc:  # a full disk, a read-only mount: one line, exit 74 (train/fsio.py)
        message = io_message(exc, recipe.train.output_dir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_IO


def _train(recipe) -> int:
    from mixtral_ft.common import is_main_process
    from mixtral_ft.train.guards import Preempted, TrainingError
    from mixtral_ft.train.run import train

    try:
        train(recipe)
        if recipe.hub.push and is_main_process():  # the adapter is saved; export is the next stage's job
            from mixtral_ft.export.hub import push_after_training

            push_after_training(Path(recipe.train.output_dir), recipe)
    except TrainingError as exc:  # the run diverged: not bad input, so exit 1 rather than 2
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:  # a checkpoint is saved; 143 / 130 tell the scheduler it was a signal
        if is_main_process():  # every rank stops on the same step, with the same line
            print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def cmd_validate(args) -> int:
    from mixtral_ft.recipe import load_recipe

    failed = 0
    for path in args.recipes:
        try:
            if "=" in path and not Path(path).exists():  # train's habit: `validate R key=value`
                raise UserError(f"'{path}' is an override, not a recipe: validate takes it as --set {path}")
            load_recipe(path, args.overrides)
            print(f"ok: {path}")
        except UserError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def cmd_data(args) -> int:
    import os

    from mixtral_ft.data.preview import preview
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.model.source import model_source
    from mixtral_ft.recipe import load_recipe
    from mixtral_ft.train.precheck import check_data

    if args.show < 0:
        raise UserError(f"--show {args.show}: give how many rows to show, 0 or more (0: the summary alone)")
    recipe = load_recipe(args.recipe, args.overrides)
    check_data(recipe)  # train's precheck of the sources, before datasets loads
    tokenizer_folder = model_source(recipe.model.name, recipe.model.revision).tokenizer_folder()  # nothing fetched
    tokenizer = load_tokenizer(tokenizer_folder, mode="finetuning")  # as train/run.py, from that folder
    color = not args.json and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(preview(recipe, tokenizer, show=args.show, color=color, as_json=args.json))
    return 0


def cmd_audit(args) -> int:
    from mixtral_ft.model.audit import audit_model
    from mixtral_ft.model.load import apply_lora, load_model, load_recipe_model

    target = args.model_or_recipe
    if target.lower().endswith((".yaml", ".yml")):
        from mixtral_ft.recipe import load_recipe

        flag = ["model.quantize_experts=false"] if args.bf16_experts else []  # the flag, last, wins
        recipe = load_recipe(target, [*args.overrides, *flag])
        model = apply_lora(load_recipe_model(recipe.model), recipe.lora, adapter=recipe.model.adapter)
    else:
        if args.overrides:
            raise UserError("key=value overrides apply to recipes only: pass a recipe, or drop them")
        model = load_model(target, quantize_experts=not args.bf16_experts)
    report = audit_model(model)
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1


def cmd_tiny(args) -> int:
    from mixtral_ft.export.staging import staged_folder
    from mixtral_ft.model.tiny import write_tiny

    out = Path(args.dir)
    with staged_folder(out, "DIR") as staging:  # an interrupted write leaves no half model
        write_tiny(staging, layout=args.layout, seed=args.seed)
    print(f"wrote tiny Mixtral ({args.layout} layout) and the Mixtral tokenizer to {out}")
    return 0


def cmd_quantize(args) -> int:
    from transformers import AutoConfig, GenerationConfig

    from mixtral_ft.common import say
    from mixtral_ft.data.tokenizer import load_tokenizer, save_tokenizer
    from mixtral_ft.export.staging import refuse_nonempty, staged_folder
    from mixtral_ft.model.device import check_device
    from mixtral_ft.model.load import load_model
    from mixtral_ft.model.loader import save_prequantized
    from mixtral_ft.model.source import model_source

    out = Path(args.out)
    refuse_nonempty(out, "OUT")  # before the load, which takes minutes on Mixtral
    check_device(args.device)
    say("quantize", f"resolving {args.model}")
    model_from = model_source(args.model)
    source = model_from.local_path()
    say("quantize", f"loading and quantizing {args.model} to NF4 (Mixtral: minutes)")
    model = load_model(model_from, quantize_experts=not args.bf16_experts, device=args.device)
    with staged_folder(out, "OUT") as staging:  # an interrupted run leaves no half model
        say("quantize", f"writing {out}")
        save_prequantized(model, staging, source=args.model)
        AutoConfig.from_pretrained(source).save_pretrained(staging)
        if (source / "generation_config.json").exists():
            GenerationConfig.from_pretrained(source).save_pretrained(staging)
        save_tokenizer(load_tokenizer(source), staging)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
    print(f"wrote pre-quantized NF4 model to {out} ({size:.2f} GiB); use it as model.name")
    return 0


def cmd_merge(args) -> int:
    from mixtral_ft.export.merge import merge_adapter

    info = merge_adapter(args.adapter, args.out, **_pick(args, "base_weights", "base", "dtype", "verify", "device"))
    print(f"wrote merged model ({info['base_weights']} base weights, {info['dtype']}) to {args.out}")
    if info.get("verify", {}).get("verdict") == "FAILED":  # the folder stays, with verify.json saying why
        print(f"merge --verify FAILED: see {args.out}/verify.json", file=sys.stderr)
        return 1
    return 0


def cmd_push(args) -> int:
    from mixtral_ft.export.hub import push_folder

    push_folder(args.dir, args.repo_id, private=args.private, dry_run=args.dry_run)
    return 0


def _flags_refused(flags: list[str], why: str, fix: str) -> None:
    """One line naming the flags that would change nothing here (`why`), and how to make them count."""
    if flags:
        them = "them" if flags[1:] else "it"
        raise UserError(f"{' and '.join(flags)} would change nothing ({why}): drop {them}, or {fix}")


def _given_generation_flags(args) -> dict:
    """The generation flags on the command line (their parser defaults are None), by settings name."""
    keys = ("max_new_tokens", "temperature", "top_p", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _generation(args, *, greedy_stays: bool = True):
    """GenerationSettings from the flags given, the command's defaults for the rest.

    When the temperature is 0 (greedy) for good (`greedy_stays`: not --web, whose page can raise it),
    --top-p and --seed could change nothing, so giving them is a mistake to say, not to ignore.
    """
    from mixtral_ft.use.chat import GenerationSettings

    given = _given_generation_flags(args)
    settings = GenerationSettings(**{**args.generation_defaults, **given})
    sampling_only = [flag for flag, key in (("--top-p", "top_p"), ("--seed", "seed")) if key in given]
    if greedy_stays and settings.temperature == 0:
        why = "is 0, greedy" if "temperature" in given else f"is 0, greedy, by default for {args.command}"
        _flags_refused(sampling_only, f"sampling only, and --temperature {why}", "pass --temperature above 0")
    return settings


def _check_can_serve(args, target, quantize: bool = True) -> None:
    """Before chat/eval download or load anything: will the model fit here at all (plan/fit_check.py)?"""
    from mixtral_ft.plan.fit_check import check_can_serve

    how = {"quantize": quantize, "quantize_experts": target.quantize_experts}
    check_can_serve(target.base, target.revision, command=args.command, force=args.force, **how)


def cmd_chat(args) -> int:
    from mixtral_ft.use.chat import chat, resolve_target

    _check_can_serve(args, resolve_target(args.model, args.adapter), quantize=not args.no_quantize)
    if args.web:
        from mixtral_ft.use.webchat import serve_web

        if args.prompt is not None:
            raise UserError("--prompt and --web do not mix: --web serves an interactive chat page")
        serve_web(
            args.model,
            adapter=args.adapter,
            system=args.system,
            settings=_generation(args, greedy_stays=False),
            quantize=not args.no_quantize,
            attn_implementation=args.attn_implementation,
            **{k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None},  # else serve_web's
        )
        return 0
    web_only = [flag for flag, value in (("--host", args.host), ("--port", args.port)) if value is not None]
    _flags_refused(web_only, "--web only, for the browser page", "add --web")
    chat(
        args.model,
        adapter=args.adapter,
        prompt=args.prompt,
        system=args.system,
        settings=_generation(args),
        quantize=not args.no_quantize,
        attn_implementation=args.attn_implementation,
    )
    return 0


def cmd_eval(args) -> int:
    from mixtral_ft.use.evaluate import eval_quantizes, evaluate, resolve_eval_target

    keys = ("adapter", "data", "samples", "out", "max_rows", "attn_implementation")
    given = [f"--{k.replace('_', '-')}" for k in _given_generation_flags(args)]
    if args.samples == 0:
        why = "generation flags shape the sample generations, and --samples 0 makes none"
        _flags_refused(given, why, "pass --samples N")
    target = resolve_eval_target(args.target, args.adapter)[1]
    _check_can_serve(args, target, quantize=eval_quantizes(target))
    evaluate(args.target, settings=_generation(args), **_pick(args, *keys))
    return 0


def cmd_plan(args) -> int:
    from mixtral_ft.plan.preflight import run_plan

    return run_plan(args.recipe, args.overrides, gpu_mem=args.gpu_mem, num_gpus=args.num_gpus, as_json=args.json)


def cmd_bench(args) -> int:
    from mixtral_ft.bench.throughput import main as bench_main

    return bench_main(args.bench_args)
