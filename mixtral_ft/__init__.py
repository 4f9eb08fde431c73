"""mixtral_ft: QLoRA fine-tuning of Mixtral-8x7B with NF4 experts on transformers 5, peft, TRL and accelerate.

The pipeline reads top to bottom: recipe -> data -> model (load, quantize, LoRA, audit) -> train -> export.
"""

__version__ = "0.1.0"

__all__ = ["load_model", "load_recipe", "__version__"]


def __getattr__(name):
    # Lazy, so `mixtral-ft validate` and `--help` answer without importing torch.
    if name == "load_model":
        from mixtral_ft.model.load import load_model

        return load_model
    if name == "load_recipe":
        from mixtral_ft.recipe import load_recipe

        return load_recipe
    raise AttributeError(name)
