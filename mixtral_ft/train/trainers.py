"""One trainer factory for SFT and DPO: the Trainer arguments come from the recipe once, the method adds a few.

Both methods train the same LoRA model the same way (schedule, precision, logging and reporting,
checkpoints, distributed settings); what differs is a row of `METHODS`: TRL's config and trainer classes
and the handful of arguments only that method has. TRL owns the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixtral_ft.data.encode import bars_for
from mixtral_ft.data.rows import dpo_rows, sft_rows  # shared with `mixtral-ft data`
from mixtral_ft.recipe import Recipe

# train.* keys that are TrainingArguments of the same name and meaning: the recipe maps onto the trainer's own
# arguments rather than copying them field by field.
SAME_NAME = (
    "output_dir", "max_steps", "num_train_epochs", "save_steps", "seed", "learning_rate", "lr_scheduler_type",
    "weight_decay", "max_grad_norm", "optim", "per_device_train_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "logging_steps", "save_total_limit",
)  # fmt: skip


def trainer_arguments(recipe: Recipe, dtype: torch.dtype, has_eval: bool) -> dict[str, Any]:
    """The transformers TrainingArguments both methods share, from the recipe's train and logging sections."""
    from mixtral_ft.train.reporting import report_to

    t = recipe.train
    cuda = torch.cuda.is_available()
    return {name: getattr(t, name) for name in SAME_NAME} | dict(
        save_strategy="steps",
        data_seed=t.seed,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of all steps
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # eval_steps null: at each checkpoint, so the loss plot has an eval curve. Under train.compile too: eval
        # recompiles the layers for no_grad; what used to fail there was bitsandbytes repacking a Linear4bit's
        # weight in place on the first no_grad CPU forward, under a graph compiled for its NF4 shape, which
        # model/cpu_bf16.keep_layout now prevents.
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps or t.save_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        report_to=report_to(recipe),  # wandb / tensorboard from logging.report_to; see configure_reporting
        run_name=recipe.logging.run_name or Path(t.output_dir).name,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (guards.NanGuard stops on it), not as the mean so far
        hub_token=None,  # training_args.bin pickles these arguments into every checkpoint: never a token
        use_cpu=not cuda,  # as default_device(); under torchrun this picks CPU DDP on gloo
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=True,
        disable_tqdm=False,
    )


def sft_arguments(recipe: Recipe, pad_token: str) -> dict[str, Any]:
    t = recipe.train
    return dict(
        max_length=t.max_length,
        packing=t.packing,
        pad_token=pad_token,
        dataset_num_proc=None,
        # Pass the recipe's value even when 0: left unset, TRL takes the model config's (0.02 for Mixtral) and
        # turns the aux loss on. TRL then asks for router logits only when it is > 0, and masks padding.
        router_aux_loss_coef=t.router_aux_loss_coef,
        # Our rows are pre-tokenized with exact assistant masks (data/conversations.py): TRL's documented path for
        # such rows builds the labels from `assistant_masks`, truncates and packs; it never re-renders the chat.
        assistant_only_loss=False,
        # transformers' NEFTune hook on the input embeddings (train mode only); rules.py keeps it out of DPO.
        neftune_noise_alpha=t.neftune_noise_alpha,
    )


def dpo_arguments(recipe: Recipe, pad_token: str) -> dict[str, Any]:
    t, d = recipe.train, recipe.dpo
    return dict(
        max_length=t.max_length,  # data/prefs.py already cut every pair to it
        router_aux_loss_coef=t.router_aux_loss_coef,
        pad_token=pad_token,
        beta=d.beta,
        loss_type=[d.loss_type],
        disable_dropout=True,  # policy and reference log-probs must come from the same deterministic network
    )


def dpo_summary(trainer) -> dict:
    from mixtral_ft.train.dpo import dpo_summary

    return dpo_summary(trainer.state.log_history)


def dpo_finish(folder) -> None:
    from mixtral_ft.train.dpo import drop_reference_copy

    drop_reference_copy(folder)


@dataclass(frozen=True)
class Method:
    rows: Callable  # (recipe, tokenizer) -> SFTData with .train, .eval, .reports
    classes: Callable[[], tuple[type, type]]  # TRL's config and trainer classes (imported when used: TRL is slow)
    arguments: Callable[[Recipe, str], dict[str, Any]]
    trainer_kwargs: dict[str, Any]
    summary: Callable = lambda trainer: {}  # method-specific run.json entries
    after_save: Callable = lambda folder: None


def _sft_classes():
    from trl import SFTConfig

    from mixtral_ft.train.trl_trainers import RunSFTTrainer

    return SFTConfig, RunSFTTrainer


def _dpo_classes():
    from trl import DPOConfig

    from mixtral_ft.train.dpo import TokenizedDPOTrainer

    return DPOConfig, TokenizedDPOTrainer


METHODS = {
    "sft": Method(sft_rows, _sft_classes, sft_arguments, {}),
    # ref_model=None and no peft_config: TRL keeps the reference as a frozen copy of the starting adapter (dpo.py).
    "dpo": Method(
        dpo_rows,
        _dpo_classes,
        dpo_arguments,
        {"ref_model": None},
        summary=dpo_summary,
        after_save=dpo_finish,
    ),
}


def build_trainer(recipe: Recipe, model, tokenizer, train_rows, eval_rows, callbacks: list):
    """TRL's trainer for `recipe.train.method`, on the LoRA-wrapped NF4 model and pre-tokenized rows."""
    method = METHODS[recipe.train.method]
    dtype = model.get_base_model().dtype
    # MistralCommonBackend names id 0 "<pad>" but its vocabulary calls it "<unk>"; TRL looks the name up.
    pad_token = tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id)
    config_class, trainer_class = method.classes()
    args = config_class(
        **trainer_arguments(recipe, dtype, eval_rows is not None), **method.arguments(recipe, pad_token)
    )
    trainable = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    # TRL prepares the rows again (labels, truncation): six datasets bars for a few rows, as data/encode.py's.
    with bars_for(len(train_rows)):
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=tokenizer,
            callbacks=callbacks,
            **method.trainer_kwargs,
        )
    # TRL casts a 4-bit model's LoRA weights to bf16, but a resume loads them through peft as fp32: the resumed run
    # would train in another precision, and at DPO learning rates most Adam steps would round away. Keep them fp32.
    for name, p in model.named_parameters():
        if name in trainable:
            p.data = trainable[name]
    return trainer
