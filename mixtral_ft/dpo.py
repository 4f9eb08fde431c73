"""DPO through TRL's DPOTrainer on the NF4 model and its LoRA adapter, with no second model in memory.

We hand TRL our LoRA-wrapped PeftModel with `ref_model=None` and no `peft_config` (given a peft_config TRL
would wrap the model itself; alignment-handbook's QLoRA DPO recipe fails on "You passed both a ref_model and
a peft_config"). TRL 1.16 then keeps the reference as a frozen copy of the starting adapter, named "ref", and
gets reference log-probs by switching to it: the reference is the policy DPO starts from (the base model for
a fresh adapter, the SFT model when `model.adapter` continues an SFT run), held as one LoRA-sized copy.
TRL never calls peft's `prepare_model_for_kbit_training` (which would upcast every non-4-bit weight to fp32).
Three of its defaults don't suit us and are changed here:
- it casts the trainable LoRA weights of a 4-bit model to bf16. At DPO learning rates (5e-6) most of Adam's
  steps are smaller than half of bf16's spacing for LoRA weights (6e-5 at 0.01) and would round away, and the
  policy would no longer equal the fp32 "ref" copy at step 0; we restore the weights exactly as they were;
- it tokenizes again through `apply_chat_template`, which MistralCommonBackend cannot do for a pair
  (prefs.py): we feed the Mixtral-format ids prefs.py made;
- it saves every adapter, so the "ref" copy would land in output_dir/ref/: we save the trained adapter only.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from trl import DPOConfig, DPOTrainer

from mixtral_ft.prefs import PAIR_COLUMNS
from mixtral_ft.recipe import Recipe

REF_ADAPTER = "ref"  # the name TRL 1.16 gives its frozen copy of the starting adapter
REWARD_KEYS = {"accuracy": "rewards/accuracies", "margin": "rewards/margins",
               "chosen": "rewards/chosen", "rejected": "rewards/rejected"}


class MixtralDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, fed with pre-tokenized pairs and saving the trained adapter only."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
        if missing:
            raise TypeError(f"DPO rows must come tokenized from mixtral_ft.prefs (missing {missing})")
        return dataset  # prefs.fit has already cut every pair to max_length

    def _save(self, output_dir=None, state_dict=None):
        model = self.accelerator.unwrap_model(self.model)
        trained = [name for name in model.peft_config if name != REF_ADAPTER]
        model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=trained)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # back to the class's method


def dpo_config(recipe: Recipe, dtype: torch.dtype, has_eval: bool, pad_token: str) -> DPOConfig:
    """train.sft_config's Trainer settings, plus the recipe's dpo section.

    Taking every Trainer argument from the SFT config keeps the two methods training alike (schedule,
    precision, logging and reporting, checkpoints, distributed settings) as train.py grows. Of TRL's own
    arguments only `max_length` and `router_aux_loss_coef` mean the same in both; `loss_type`, `pad_token`
    and the rest keep DPO's meaning and defaults.
    """
    from transformers import TrainingArguments

    from mixtral_ft.train import sft_config

    sft = sft_config(recipe, dtype, has_eval, pad_token)
    shared = [f.name for f in dataclasses.fields(TrainingArguments) if f.init] + ["max_length", "router_aux_loss_coef"]
    d = recipe.dpo
    return DPOConfig(
        **{name: getattr(sft, name) for name in shared},  # max_length: prefs.fit already cut every pair to it
        beta=d.beta,
        loss_type=[d.loss_type],
        disable_dropout=True,  # policy and reference log-probs must come from the same deterministic network
    )


def build_dpo_trainer(recipe: Recipe, model, tokenizer, train_rows, eval_rows, callbacks: list):
    """A DPO trainer for the LoRA-wrapped model (mixtral_ft.model.apply_lora) and prefs.py's rows."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError("build_dpo_trainer needs the LoRA-wrapped model from mixtral_ft.model.apply_lora")
    dtype = model.get_base_model().dtype
    # MistralCommonBackend names id 0 "<pad>" but its vocabulary calls it "<unk>"; TRL checks the name.
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id)
    args = dpo_config(recipe, dtype, eval_rows is not None, tokenizer.pad_token)
    trainable = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
    trainer = MixtralDPOTrainer(model=model, ref_model=None, args=args,
                                train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
                                callbacks=callbacks)
    for name, param in model.named_parameters():  # undo TRL's bf16 cast (see the module docstring)
        if name in trainable:
            param.data = trainable[name]
    return trainer


def dpo_summary(history: list[dict]) -> dict:
    """Reward accuracy, margin and rewards for run.json: the last logged values, per-step values, last eval."""
    logged = [h for h in history if REWARD_KEYS["margin"] in h]
    rewards = [{"step": h["step"], **{k: h[key] for k, key in REWARD_KEYS.items()}} for h in logged]
    last = rewards[-1] if rewards else {}
    summary = {f"reward_{k}": last.get(k) for k in REWARD_KEYS}
    summary["rewards"] = rewards
    evals = [h for h in history if f"eval_{REWARD_KEYS['margin']}" in h]
    if evals:
        summary["eval_rewards"] = {"step": evals[-1]["step"],
                                   **{k: evals[-1][f"eval_{key}"] for k, key in REWARD_KEYS.items()}}
    return summary
