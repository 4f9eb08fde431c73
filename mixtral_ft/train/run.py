"""Training: recipe -> data -> NF4 model + LoRA -> audit -> TRL SFT or DPO trainer -> adapter and run.json.

Run it as `mixtral-ft train RECIPE [key=value ...]`, or under a launcher:
`accelerate launch -m mixtral_ft.train RECIPE ...` (torchrun works too). The story is linear on
purpose: seed, tokenizer, data, model, audit, trainer, train, save. TRL owns the loop.
"""

from __future__ import annotations

import json
import platform
import signal
import time
from pathlib import Path

import torch

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import Recipe, check_trainer_names, dump_recipe


def check_output_dir(recipe: Recipe) -> Path:
    """Refuse to overwrite another run or to write where we cannot, before any heavy work."""
    from mixtral_ft.train.outdir import prepare
    from mixtral_ft.train.resume import check_existing_run

    out = Path(recipe.train.output_dir)
    if out.is_dir():
        check_existing_run(recipe, out)  # a finished run, or checkpoints with train.resume=false: UserError
    prepare(out)
    return out


def library_versions() -> dict[str, str]:
    import accelerate
    import bitsandbytes
    import datasets
    import peft
    import transformers
    import trl

    from mixtral_ft import __version__

    mods = {
        "mixtral_ft": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }
    mods["python"] = platform.python_version()
    return mods


def check_inputs(recipe: Recipe):
    """What can be checked before minutes of loading: trainer names, the adapter folder, the model source, levers."""
    from mixtral_ft.model.source import model_source
    from mixtral_ft.train.levers import check_levers

    check_trainer_names(recipe)  # a misspelled train.optim / train.lr_scheduler_type
    if recipe.model.adapter:  # apply_lora checks it too, but only after the model has loaded
        from mixtral_ft.model.load import check_adapter_targets

        check_adapter_targets(recipe.model.adapter)
    source = model_source(recipe.model.name, recipe.model.revision)
    if source.kind == "local":  # load_model checks it too, but only after the data has loaded
        from mixtral_ft.model.load import check_experts_request
        from mixtral_ft.model.loader import read_manifest

        check_experts_request(read_manifest(source.local_path()), recipe.model.quantize_experts, recipe.model.name)
    check_levers(recipe, source)  # train.liger without CUDA or the package; too many skip_checkpoint_layers
    return source


def trainable_model(recipe: Recipe, source):
    """The recipe's NF4 model with its LoRA adapter, ready for the trainer, after the audit passed."""
    from transformers import set_seed

    from mixtral_ft.common import is_main_process
    from mixtral_ft.distributed import prepare_for_distributed
    from mixtral_ft.model.audit import audit_model
    from mixtral_ft.model.load import apply_lora, load_recipe_model
    from mixtral_ft.model.torch_compile import compile_layers

    model = load_recipe_model(recipe.model, source)
    model.config.use_cache = False
    if recipe.train.liger:
        from mixtral_ft.train.levers import apply_liger

        apply_liger(model)  # on the base model, before LoRA wraps its layers
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
    return model, audit


def train(recipe: Recipe) -> dict:
    """Run one SFT or DPO job end to end; returns the run summary that is also written to run.json."""
    from transformers import set_seed

    from mixtral_ft.common import is_main_process
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.distributed import local_main_first
    from mixtral_ft.model.device import default_device
    from mixtral_ft.train.callbacks import make_callbacks
    from mixtral_ft.train.guards import run_trainer
    from mixtral_ft.train.memory import PhaseMemory
    from mixtral_ft.train.outdir import replace_deferred
    from mixtral_ft.train.reporting import configure_reporting, wandb_session
    from mixtral_ft.train.resume import find_resume_checkpoint
    from mixtral_ft.train.telemetry import attach
    from mixtral_ft.train.trainers import METHODS, build_trainer

    started = time.time()
    out = check_output_dir(recipe)
    resume_from = find_resume_checkpoint(recipe, out)  # before the model loads: a bad train.resume fails fast
    source = check_inputs(recipe)
    set_seed(recipe.train.seed)

    tokenizer = load_tokenizer(source.local_path(), mode="finetuning")
    method = METHODS[recipe.train.method]
    with local_main_first():  # the machine's other ranks then read local rank 0's tokenized cache
        data = method.rows(recipe, tokenizer)  # conversations or preference pairs, as Mixtral-format ids
    for report in data.reports if is_main_process() else ():  # every rank loads the data; rank 0 reports
        print(report.line(), flush=True)
    memory = PhaseMemory(default_device())
    memory.loading()
    model, audit = trainable_model(recipe, source)
    memory.loaded()  # the load peak and the loaded footprint; the training peak starts from here

    dtype = model.get_base_model().dtype
    note_packing_kernel(recipe)
    note_dpo_dropout(recipe)
    note_compile_dtype(recipe, dtype)
    replace_deferred(out)  # train.overwrite: the previous run goes only now that nothing can fail with exit 2
    callbacks = make_callbacks(recipe, out)
    configure_reporting(recipe, out)  # wandb project/dir/offline and the tensorboard dir, read at trainer init
    trainer = build_trainer(recipe, model, tokenizer, data.train, data.eval, callbacks)
    attach(trainer)  # telemetry callbacks ahead of the reporters, so wandb/tensorboard get their scalars

    def finish(result) -> dict:
        summary = summarize(recipe, trainer, result, started, dtype, memory)
        note_compile_fallback(summary)
        summary.update(method.summary(trainer))  # DPO: reward accuracy and margins from TRL's log history
        save_outputs(recipe, trainer, tokenizer, summary, audit=audit, reports=data.reports)
        return summary

    # Raises Preempted after a mid-run SIGTERM/SIGINT checkpoint; a signal during the final save waits for it.
    with wandb_session(recipe, out, resume_from):  # a resumed run logs on to its wandb run
        summary, late_signal = run_trainer(trainer, resume_from, finish, peak=memory.overall_peak_gib)
    if late_signal:  # the run is complete; only the push (minutes, maybe) is skipped
        raise finished_but_signalled(recipe, out, late_signal)
    return summary


def finished_but_signalled(recipe: Recipe, out: Path, late_signal: int) -> Exception:
    """The Preempted to raise when a stop signal came during the final save: the run itself is whole."""
    from mixtral_ft.train.guards import Preempted

    push = f"; hub push skipped: mixtral-ft push {out}" if recipe.hub.push else ""
    return Preempted(
        f"{signal.Signals(late_signal).name} received as the run ended: it finished and is saved in {out}{push}",
        late_signal,
    )


def note_packing_kernel(recipe: Recipe) -> None:
    """Packing is correct either way (position_ids); on a GPU only flash-attention keeps it fast."""
    from mixtral_ft.common import is_main_process

    t, m = recipe.train, recipe.model
    if t.packing and torch.cuda.is_available() and m.attn_implementation != "flash_attention_2" and is_main_process():
        print(
            "note: train.packing with sdpa attends through a dense block mask; model.attn_implementation: "
            "flash_attention_2 keeps the flash kernel",
            flush=True,
        )


def note_dpo_dropout(recipe: Recipe) -> None:
    """TRL's DPO turns every dropout off (disable_dropout), so a DPO run's lora.dropout would pass without effect."""
    from mixtral_ft.common import is_main_process

    if recipe.train.method == "dpo" and recipe.lora.dropout and not recipe.model.adapter and is_main_process():
        print(
            f"note: lora.dropout {recipe.lora.dropout} does not apply to DPO: TRL turns dropout off so that the "
            "policy and reference log-probs come from the same network (lora.dropout: 0 says so)",
            flush=True,
        )


def note_compile_dtype(recipe: Recipe, dtype: torch.dtype) -> None:
    """Compiled grouped GEMM takes bf16 only; elsewhere the experts' host sync breaks the checkpointed graph."""
    from mixtral_ft.common import is_main_process

    if recipe.train.compile and dtype != torch.bfloat16 and is_main_process():
        print(
            f"note: train.compile traces the layers whole in bfloat16 only; in {str(dtype).removeprefix('torch.')} "
            "the experts' per-expert loop breaks the graph and the layers run eager (run.json's compile counts it): "
            "model.compute_dtype: bfloat16",
            flush=True,
        )


def note_compile_fallback(summary: dict) -> None:
    """Past torch's recompile limit new modes run eager silently: the same numbers, not the speed."""
    from mixtral_ft.common import is_main_process

    hits = summary.get("compile", {}).get("recompile_limit_hits", 0)
    if hits and is_main_process():
        print(
            f"note: torch.compile met its recompile limit {hits} time(s), so some layer calls ran eager "
            "(run.json's compile counts graphs): TORCH_LOGS=recompiles lists why each graph was compiled",
            flush=True,
        )


def save_outputs(recipe: Recipe, trainer, tokenizer, summary: dict, *, audit, reports) -> None:
    """The adapter, then (rank 0) the tokenizer, recipe.yaml, run.json, audit, data report and model card."""
    from mixtral_ft.data.tokenizer import save_tokenizer
    from mixtral_ft.model.load import set_adapter_base
    from mixtral_ft.train.outputs import closing_line, write_run_files
    from mixtral_ft.train.trainers import METHODS

    out = Path(recipe.train.output_dir)
    # Every rank calls save_model: under FSDP and ZeRO-3 gathering the adapter is collective; only rank 0 writes.
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    METHODS[recipe.train.method].after_save(out)  # DPO: drop TRL's frozen reference copy
    save_tokenizer(tokenizer, out)
    set_adapter_base(out, recipe.model.name)  # the hub id, not the local cache folder, for serving engines
    dump_recipe(recipe, out / "recipe.yaml")
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_run_files(out, audit, reports)  # audit.json, data_report.json and our model card
    print(closing_line(out), flush=True)


def summarize(recipe: Recipe, trainer, result, started: float, dtype: torch.dtype, memory) -> dict:
    from mixtral_ft.model.torch_compile import compile_report
    from mixtral_ft.train.carry import carried_runtime, paused_seconds, resumed_at_step, run_peak_gib

    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    runtime = result.metrics.get("train_runtime", time.time() - started)
    runtime += carried_runtime(trainer)  # a resumed run's throughput covers the whole run
    paused = paused_seconds(trainer, whole_run=True)  # evaluation and checkpoint saves: not training
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    tokens = int(tokens) if tokens is not None else None  # TRL counts in floats: 1340.0
    device = trainer.args.device
    return {
        "method": recipe.train.method,
        "model": recipe.model.name,
        "seed": recipe.train.seed,
        "steps": trainer.state.global_step,
        "resumed_at_step": resumed_at_step(trainer),  # then wall_s and memory are this last part's only
        "world_size": trainer.args.world_size,
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss": result.training_loss,
        "losses": losses,
        "eval_losses": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "tokens": tokens,
        # TRL counts tokens on all ranks
        "tokens_per_s": round(tokens / max(runtime - paused, 1e-9), 1) if tokens else None,
        "train_runtime_s": round(runtime, 2),
        "eval_and_save_s": round(paused, 2),
        "wall_s": round(time.time() - started, 2),
        # load or training, whichever was higher, on any rank, in any part of a resumed run (a collective)
        "peak_memory_gib": round(run_peak_gib(trainer, memory.overall_peak_gib()), 3),
        "memory": memory.summary(),  # by phase, this rank's (run.json is rank 0's): see train/memory.py
        **({"compile": compile_report()} if recipe.train.compile else {}),
        "versions": library_versions(),
    }
