"""The recipe stage: one YAML file → frozen dataclasses, checked strictly before anything heavy runs.

`sections.py` holds the recipe's sections, `rules.py` the values they accept and the cross-field rules,
`schema.py` the generic strict YAML → dataclass parsing (unknown keys, types, overrides, secrets) and
`safeyaml.py` the bounded YAML reader under it.
"""

from mixtral_ft.recipe.rules import (
    ATTENTION_TARGETS,
    ATTN_IMPLEMENTATIONS,
    LM_HEAD_BYPASSED,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    check_trainer_names,
    is_repo_id,
)
from mixtral_ft.recipe.sections import (
    DataSection,
    LoraSection,
    MixtureSource,
    Recipe,
    TrainSection,
    dump_recipe,
    load_recipe,
)

__all__ = [
    "ATTENTION_TARGETS",
    "ATTN_IMPLEMENTATIONS",
    "LM_HEAD_BYPASSED",
    "PREFERENCE_FORMATS",
    "SFT_FORMATS",
    "DataSection",
    "LoraSection",
    "MixtureSource",
    "Recipe",
    "TrainSection",
    "check_trainer_names",
    "dump_recipe",
    "is_repo_id",
    "load_recipe",
]
