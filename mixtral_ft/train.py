"""Training: recipe -> data -> NF4 model + LoRA -> audit -> TRL SFT or DPO trainer -> adapter and run.json.

Run it as `mixtral-ft train RECIPE [key=value ...]`, or under a launcher:
`accelerate launch -m mixtral_ft.train RECIPE ...` (torchrun works too). The story is linear on
purpose: seed, tokenizer, data, model, audit, trainer, train, save. TRL owns the loop.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import Recipe, check_trainer_names, dump_recipe


def check_output_dir(recipe: Recipe) -> Path:
    """Refuse to overwrite another run or to write where we cannot, before any heavy work."""
    out = Path(recipe.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir '{out}' is a file: choose a folder path")
    if out.is_dir():
        from mixtral_ft.resume import check_existing_run

        check_existing_run(recipe, out)  # a finished run, or checkpoints with train.resume=false: UserError
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"  # one per process: ranks probe the same folder at once
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"train.output_dir '{out}' is not writable ({exc.strerror}): choose another folder") from None
    return out


def sft_config(recipe: Recipe, dtype: torch.dtype, has_eval: bool, pad_token: str):
    from trl import SFTConfig

    from mixtral_ft.telemetry import report_to

    t = recipe.train
    return SFTConfig(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        save_steps=t.save_steps,
        save_strategy="steps",
        seed=t.seed,
        data_seed=t.seed,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of all steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=t.max_length,
        packing=t.packing,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        report_to=report_to(recipe),  # wandb / tensorboard from logging.report_to; see configure_reporting
        run_name=recipe.logging.run_name or Path(t.output_dir).name,
        # Pass the recipe's value even when 0: left unset, TRL takes the model config's (0.02 for Mixtral) and
        # turns the aux loss on. TRL then asks for router logits only when it is > 0, and masks padding.
        router_aux_loss_coef=t.router_aux_loss_coef,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (guards.NanGuard stops on it), not as the mean so far
        hub_token=None,  # training_args.bin pickles these arguments into every checkpoint: never a token
        use_cpu=not torch.cuda.is_available(),  # as default_device(); under torchrun this picks CPU DDP on gloo
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=True,
        assistant_only_loss=False,  # our data already carries exact assistant masks (see data.py)
        dataset_num_proc=None,
        disable_tqdm=False,
        pad_token=pad_token,
    )


def library_versions() -> dict[str, str]:
    import accelerate
    import bitsandbytes
    import datasets
    import peft
    import transformers
    import trl

    from mixtral_ft import __version__

    mods = {"mixtral_ft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "trl": trl.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    mods["python"] = platform.python_version()
    return mods


def build_sft_trainer(recipe: Recipe, model, tokenizer, train_rows, eval_rows, callbacks: list):
    from trl import SFTTrainer

    dtype = model.get_base_model().dtype
    # MistralCommonBackend names id 0 "<pad>" but its vocabulary calls it "<unk>"; TRL looks the name up.
    pad_token = tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id)
    trainable = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    trainer = SFTTrainer(model=model, args=sft_config(recipe, dtype, eval_rows is not None, pad_token),
                         train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
                         callbacks=callbacks)
    # TRL casts a 4-bit model's LoRA weights to bf16, but a resume loads them through peft as fp32: the resumed
    # run would train in another precision. Keep them fp32 (as dpo.py does): exact resume, no rounded-away steps.
    for name, p in model.named_parameters():
        if name in trainable:
            p.data = trainable[name]
    return trainer


def train(recipe: Recipe) -> dict:
    """Run one SFT or DPO job end to end; returns the run summary that is also written to run.json."""
    from transformers import set_seed

    from mixtral_ft.audit import audit_model
    from mixtral_ft.callbacks import make_callbacks
    from mixtral_ft.data import load_sft_data
    from mixtral_ft.guards import Preempted, run_trainer
    from mixtral_ft.launch import is_main_process, prepare_for_distributed
    from mixtral_ft.model import apply_lora, compile_layers, load_model, resolve_model_path
    from mixtral_ft.resume import find_resume_checkpoint
    from mixtral_ft.serving import set_adapter_base
    from mixtral_ft.telemetry import attach, configure_reporting
    from mixtral_ft.tokenizer import load_tokenizer, save_tokenizer

    started = time.time()
    out = check_output_dir(recipe)
    resume_from = find_resume_checkpoint(recipe, out)  # before the model loads: a bad train.resume fails fast
    check_trainer_names(recipe)  # likewise a misspelled train.optim / train.lr_scheduler_type
    adapter = recipe.model.adapter  # apply_lora checks it too, but only after minutes of model loading
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"model.adapter '{adapter}' is not an adapter folder (no adapter_config.json)")
    set_seed(recipe.train.seed)

    model_path = resolve_model_path(recipe.model.name, recipe.model.revision)
    tokenizer = load_tokenizer(model_path, mode="finetuning")
    if recipe.train.method == "dpo":  # preference pairs, tokenized in Mixtral's format (prefs.py)
        from mixtral_ft.prefs import load_preference_data

        data = load_preference_data(recipe.data, tokenizer, max_length=recipe.train.max_length,
                                    max_prompt_length=recipe.dpo.max_prompt_length, seed=recipe.train.seed)
    else:
        data = load_sft_data(recipe.data, tokenizer, max_length=recipe.train.max_length, seed=recipe.train.seed)
    for report in data.reports if is_main_process() else ():  # every rank loads the data; rank 0 reports
        print(report.line(), flush=True)
    train_rows, eval_rows = data.train, data.eval
    if recipe.train.method == "sft" and not recipe.train.assistant_only_loss:  # TRL applies an `assistant_masks` column whenever present
        train_rows = train_rows.remove_columns("assistant_masks")
        eval_rows = eval_rows.remove_columns("assistant_masks") if eval_rows is not None else None

    model = load_model(str(model_path), quantize_experts=recipe.model.quantize_experts,
                       compute_dtype=recipe.model.compute_dtype,
                       attn_implementation=recipe.model.attn_implementation)
    model.config.use_cache = False
    # LoRA's init draws from the global RNG: seed it again here, because loading may have drawn from it (building
    # the tiny model seeds and draws), and the same seed must give the same adapter whether or not it was cached.
    set_seed(recipe.train.seed)
    model = prepare_for_distributed(apply_lora(model, recipe.lora, adapter=recipe.model.adapter))
    if recipe.train.compile:
        compile_layers(model)
    audit = audit_model(model, quantize_experts=recipe.model.quantize_experts)
    if is_main_process():
        print(audit.table(), flush=True)
    if not audit.ok:
        raise UserError(f"audit failed: {audit.failures[0]} (run `mixtral-ft audit` for the full table)")

    dtype = model.get_base_model().dtype
    if recipe.train.packing and torch.cuda.is_available() and recipe.model.attn_implementation != "flash_attention_2" \
            and is_main_process():  # correct either way (position_ids); only the speed differs
        print("note: train.packing with sdpa attends through a dense block mask; model.attn_implementation: "
              "flash_attention_2 keeps the flash kernel", flush=True)
    from mixtral_ft.outdir import replace_deferred

    replace_deferred(out)  # train.overwrite: the previous run goes only now that nothing can fail with exit 2
    callbacks = make_callbacks(recipe, out)
    configure_reporting(recipe, out)  # wandb project/dir/offline and the tensorboard dir, read at trainer init
    if recipe.train.method == "dpo":  # TRL's DPOTrainer on the same LoRA model; reference = starting adapter
        from mixtral_ft.dpo import build_dpo_trainer as build_trainer
    else:
        build_trainer = build_sft_trainer
    trainer = build_trainer(recipe, model, tokenizer, train_rows, eval_rows, callbacks)
    attach(trainer)  # telemetry callbacks ahead of the reporters, so wandb/tensorboard get their scalars

    def finish(result) -> dict:
        summary = summarize(recipe, trainer, result, started, dtype)
        if recipe.train.method == "dpo":  # reward accuracy and margins from TRL's log history
            from mixtral_ft.dpo import dpo_summary

            summary.update(dpo_summary(trainer.state.log_history))
        # Every rank calls save_model: under FSDP and ZeRO-3 gathering the adapter is collective; only rank 0 writes.
        trainer.save_model(str(out))
        if trainer.is_world_process_zero():
            save_tokenizer(tokenizer, out)
            set_adapter_base(out, recipe.model.name)  # the hub id, not the local cache folder, for serving engines
            dump_recipe(recipe, out / "recipe.yaml")
            (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"saved adapter, tokenizer, recipe.yaml and run.json to {out}", flush=True)
        return summary

    # Raises Preempted after a mid-run SIGTERM/SIGINT checkpoint; a signal during the final save waits for it.
    summary, late_signal = run_trainer(trainer, resume_from, finish)
    if late_signal:  # the run is complete; only the push (minutes, maybe) is skipped
        push = f"; hub push skipped: mixtral-ft push {out}" if recipe.hub.push else ""
        raise Preempted(f"{signal.Signals(late_signal).name} received as the run ended: it finished and is saved "
                        f"in {out}{push}", late_signal)
    if recipe.hub.push and trainer.is_world_process_zero():
        from mixtral_ft.hub import push_after_training

        push_after_training(out, recipe)
    return summary


def summarize(recipe: Recipe, trainer, result, started: float, dtype: torch.dtype) -> dict:
    from mixtral_ft.carry import carried_runtime
    from mixtral_ft.steps import peak_gib

    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    runtime = result.metrics.get("train_runtime", time.time() - started)
    runtime += carried_runtime(trainer)  # a resumed run's throughput covers the whole run
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    device = trainer.args.device
    return {
        "method": recipe.train.method,
        "model": recipe.model.name,
        "seed": recipe.train.seed,
        "steps": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss": result.training_loss,
        "losses": losses,
        "tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if tokens else None,  # TRL counts tokens on all ranks
        "train_runtime_s": round(runtime, 2),
        "wall_s": round(time.time() - started, 2),
        "peak_memory_gib": round(peak_gib(device), 3),
        "versions": library_versions(),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m mixtral_ft.train RECIPE [key=value ...]`: the entry point accelerate and torchrun launch."""
    from mixtral_ft.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
