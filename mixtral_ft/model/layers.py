"""Mixtral's decoder layers found through any wrapper (peft, DDP, FSDP), and which of them are recomputed.

No heavy imports: bench/steps.py, which the transformers 4.57 peer runs in its side environment, uses it too.
"""

from __future__ import annotations


def decoder_layers(model) -> list:
    """The decoder layers in order: transformers' checkpointable layers, wherever the wrappers put them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def keep_last_layers_whole(model, count: int) -> None:
    """Checkpointing off for the last `count` decoder layers: they keep their activations and are not
    recomputed. Call it after checkpointing is enabled, which turns every layer's flag on."""
    for layer in decoder_layers(model)[-count:] if count else []:
        layer.gradient_checkpointing = False
