"""The recipe stage: one YAML file → frozen dataclasses, checked strictly before anything heavy runs.

`sections.py` holds the recipe's sections and cross-field rules; `schema.py` the generic strict
YAML → dataclass parsing (unknown keys, types, overrides, secrets).
"""

from mixtral_ft.recipe.sections import (
    ATTENTION_TARGETS,
    ATTN_IMPLEMENTATIONS,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    DataSection,
    LoraSection,
    MixtureSource,
    Recipe,
    TrainSection,
    check_trainer_names,
    dump_recipe,
    load_recipe,
)

__all__ = ["ATTENTION_TARGETS", "ATTN_IMPLEMENTATIONS", "PREFERENCE_FORMATS", "SFT_FORMATS", "DataSection", "LoraSection", "MixtureSource", "Recipe",
           "TrainSection", "check_trainer_names", "dump_recipe", "load_recipe"]
