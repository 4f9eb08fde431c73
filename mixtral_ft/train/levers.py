"""Speed levers a recipe can switch on: the ones `mixtral-ft bench` measures (benchmarks/NOTES.md), for training.

`train.reuse_dequantized` and `train.skip_checkpoint_layers` act on the decoder layers' `gradient_checkpointing`
flags, which the HF Trainer sets when `train()` starts (after the trainer is built, before `on_train_begin`), so
a callback applies them then. TRL's DPOTrainer turns checkpointing off and on again around its reference pass
inside every step (trl.models.utils.disable_gradient_checkpointing), which sets every layer's flag back to true:
the callback applies them again before each micro-batch, whose policy forward comes first. `train.liger` patches
the base model before LoRA wraps it. `check_levers` says before any heavy work what cannot run here.
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import TrainerCallback

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import Recipe


def check_levers(recipe: Recipe, source) -> None:
    """UserError (exit 2) for a lever this machine or this model cannot take: before data or weights load."""
    t = recipe.train
    if t.liger and not torch.cuda.is_available():
        raise UserError("train.liger needs a CUDA GPU (liger-kernel's Triton kernels): set train.liger=false here")
    if t.liger and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("train.liger needs the liger-kernel package: pip install liger-kernel, or set it to false")
    if t.skip_checkpoint_layers:
        layers = model_layers(source)
        if layers is not None and t.skip_checkpoint_layers > layers:
            raise UserError(
                f"'train.skip_checkpoint_layers' is {t.skip_checkpoint_layers} but {recipe.model.name} has {layers} "
                f"decoder layers: use 0 to {layers} ({layers} is the same as train.gradient_checkpointing=false)"
            )


def model_layers(source) -> int | None:
    """The model's decoder layer count from its config.json alone; None when it cannot be read now (the download
    that follows reports why)."""
    from mixtral_ft.model.hub_config import ConfigUnavailable

    try:
        return int(source.config_dict()["num_hidden_layers"])
    except (ConfigUnavailable, OSError, KeyError, ValueError):
        return None


def apply_liger(model) -> None:
    """liger-kernel's RMSNorm and RoPE kernels on the base Mixtral (before LoRA wraps it).

    Its SwiGLU would replace our NF4 experts' forward with a dense one. Its fused linear cross-entropy replaces the
    model's forward, which TRL's trainers patch with their own fused LM head (chunked log-probs: the full logits
    are never built either way); TRL refuses that combination for its own liger option, and so do we.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_mixtral

    apply_liger_kernel_to_mixtral(model=model, swiglu=False, fused_linear_cross_entropy=False, cross_entropy=False)


def set_checkpointed_layers(model, *, skip_layers: int, reuse_dequantized: bool) -> None:
    """The last `skip_layers` layers keep their activations; NF4 experts of the layers still checkpointed reuse
    the recompute's dequantized weights in backward (quant._NF4GroupedLinear). Idempotent."""
    from mixtral_ft.model.layers import keep_last_layers_whole
    from mixtral_ft.model.quant import configure_experts

    keep_last_layers_whole(model, skip_layers)
    configure_experts(model, reuse_dequantized=reuse_dequantized)


class CheckpointLevers(TrainerCallback):
    """Applies skip_checkpoint_layers and reuse_dequantized once the Trainer has enabled checkpointing, and for
    DPO again before every micro-batch (its reference pass sets the flags back; SFT never touches them again)."""

    def __init__(self, skip_layers: int, reuse_dequantized: bool, *, every_micro_batch: bool):
        self.levers = {"skip_layers": skip_layers, "reuse_dequantized": reuse_dequantized}
        self.every_micro_batch = every_micro_batch

    def _apply(self, model) -> None:
        if model is not None:
            set_checkpointed_layers(model, **self.levers)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):  # DPO's reference pass reset the flags
        if self.every_micro_batch:
            self._apply(model)

    def on_substep_end(self, args, state, control, model=None, **kwargs):  # the next micro-batch of the step
        if self.every_micro_batch:
            self._apply(model)


def lever_callbacks(recipe: Recipe) -> list:
    t = recipe.train
    if not (t.skip_checkpoint_layers or t.reuse_dequantized):  # recipe rules refuse both without checkpointing
        return []
    return [CheckpointLevers(t.skip_checkpoint_layers, t.reuse_dequantized, every_micro_batch=t.method == "dpo")]
