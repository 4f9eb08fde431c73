"""The recipe's rules: the values each key accepts and the checks that tie keys together.

Every rule failure is a `UserError` naming the key and a value that would do, raised by `validate` before
anything heavy runs, so that a run never fails late on something the recipe already said.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from mixtral_ft.errors import UserError

if TYPE_CHECKING:
    from mixtral_ft.recipe.sections import HubSection, LoggingSection, LoraSection, ModelSection, Recipe, TrainSection

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The modules of a Mixtral in transformers 5 (tests/model/test_load.py checks them): peft matches target names by
# suffix and skips, without a word, a name that matches nothing as long as another one matches.
MIXTRAL_MODULES = (
    *ATTENTION_TARGETS,
    *("model", "embed_tokens", "layers", "self_attn", "rotary_emb", "input_layernorm", "post_attention_layernorm"),
    *("mlp", "gate", "experts", "act_fn", "norm", "lm_head"),
)
# The Hub's per-expert names: peft puts them on the fused 3-D experts (w1 + w3 = gate_up_proj), in bf16 only.
EXPERT_WEIGHTS = ("w1", "w2", "w3")
# TRL's SFT and DPO trainers score through a fused LM head that multiplies by lm_head.weight itself (trl
# add_fused_lm_head, 1.x), so a LoRA on lm_head gets no gradient in training yet changes chat and eval.
LM_HEAD_BYPASSED = "TRL's fused LM head projects with the base lm_head weight, so LoRA there would never train"
SFT_FORMATS = ("messages", "sharegpt", "chatml", "alpaca", "prompt_completion")  # data.format (data/formats.py)
PREFERENCE_FORMATS = ("preference", "implicit_prompt")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
MAX_MIXTURE_ROWS = 10**8  # data.mixture_size
# TRL 1.16's DPO losses that need no setting beyond beta (exo_pair and robust need label smoothing; sft is
# not a preference loss).
DPO_LOSSES = (
    "sigmoid",
    "ipo",
    "hinge",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# --- range and consistency checks ----------------------------------------------------------------


def check_recipe(recipe: Recipe) -> None:
    """Every value in range and the keys consistent with each other; the first problem is a UserError."""
    _check_model(recipe.model)
    _check_data(recipe)
    _check_lora(recipe.lora, recipe.model.quantize_experts)
    _check_train(recipe.train)
    if recipe.train.method == "dpo":
        _check_dpo(recipe)
    _check_levers(recipe.train)
    _check_logging(recipe.logging)
    _check_hub(recipe.hub)


def _check_model(m: ModelSection) -> None:
    _need(
        m.compute_dtype in ("auto", "bfloat16", "float16", "float32"),
        "model.compute_dtype",
        "must be auto, bfloat16, float16 or float32",
    )
    _need(
        m.attn_implementation in ATTN_IMPLEMENTATIONS,
        "model.attn_implementation",
        "must be sdpa, flash_attention_2 or eager",
    )


def _check_data(recipe: Recipe) -> None:
    d, t = recipe.data, recipe.train
    known = known_formats(t.method)
    _need(d.format in known, "data.format", f"must be one of {', '.join(known)} (train.method: {t.method})")
    _check_sources(recipe)
    _need(0.0 <= d.test_size < 1.0, "data.test_size", "must be in [0, 1), e.g. 0.05")
    _need(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1], e.g. 0.1")
    _need(d.max_rows is None or d.max_rows > 0, "data.max_rows", "must be > 0 or null")
    _need(d.num_proc is None or d.num_proc > 0, "data.num_proc", "must be > 0 or null (null: by the rows and cores)")


def _check_lora(lo: LoraSection, nf4_experts: bool) -> None:
    # A rank past Mixtral's hidden size (4096) adds nothing, and allocates far past memory on the way there.
    _need(0 < lo.r <= 4096, "lora.r", "must be > 0 and at most 4096 (Mixtral's hidden size), e.g. 16")
    _need(lo.alpha > 0, "lora.alpha", "must be > 0, e.g. 32 (twice r)")
    _need(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1), e.g. 0.05")
    _need(len(lo.target_modules) > 0, "lora.target_modules", "must name at least one of q_proj, k_proj, v_proj, o_proj")
    # lm_head first: allow_other_targets does not make it train, so the error must not point there.
    _need(
        "lm_head" not in lo.target_modules,
        "lora.target_modules",
        f"has lm_head: {LM_HEAD_BYPASSED}; drop lm_head from the list",
    )
    # Before allow_other_targets: a name that matches nothing, or NF4 experts, would not take LoRA with it either.
    unknown = [x for x in lo.target_modules if x.rsplit(".", 1)[-1] not in MIXTRAL_MODULES + EXPERT_WEIGHTS]
    _need(
        not unknown,
        "lora.target_modules",
        f"has {unknown}: no Mixtral module has that name (peft would train without it); use q_proj, k_proj, "
        "v_proj, o_proj (with lora.allow_other_targets: true also embed_tokens, gate)",
    )
    experts = [x for x in lo.target_modules if x in EXPERT_WEIGHTS]
    _need(
        not (experts and nf4_experts),
        "lora.target_modules",
        f"has {experts}: peft cannot put LoRA on NF4 experts; drop them, or set model.quantize_experts: false "
        "(bf16 experts, ~90 GB) and lora.allow_other_targets: true",
    )
    _need(
        ("w1" in experts) == ("w3" in experts),
        "lora.target_modules",
        "has one of w1, w3: peft fuses them into the experts' gate_up_proj, so name both or neither",
    )
    others = [x for x in lo.target_modules if x not in ATTENTION_TARGETS]
    _need(
        not others or lo.allow_other_targets,
        "lora.target_modules",
        f"has {others}: by default LoRA goes on {list(ATTENTION_TARGETS)} only, leaving the router and experts "
        "as they are; set lora.allow_other_targets: true to adapt more",
    )


def _check_train(t: TrainSection) -> None:
    _need(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", "must be > 0, or -1 to train by epochs")
    _need(t.num_train_epochs > 0, "train.num_train_epochs", "must be > 0")
    _need(t.save_steps > 0, "train.save_steps", "must be > 0, e.g. 500")
    # The Trainer deletes older checkpoints before the newest is marked complete (its checksums.sha256 comes last):
    # with 1 kept, a kill or a full disk in between would leave nothing to resume from.
    _need(
        t.save_total_limit is None or t.save_total_limit >= 2,
        "train.save_total_limit",
        "must be >= 2 (the newest checkpoint is complete only after older ones are deleted) or null to keep all",
    )
    _need(t.learning_rate > 0, "train.learning_rate", "must be > 0, e.g. 2e-4")
    _need(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    _need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _need(t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0, e.g. 0.3")
    _need(t.per_device_train_batch_size > 0, "train.per_device_train_batch_size", "must be > 0")
    _need(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0")
    _need(t.max_length >= 16, "train.max_length", "must be >= 16 tokens, e.g. 2048")
    _need(t.logging_steps > 0, "train.logging_steps", "must be > 0")
    _need(t.eval_steps is None or t.eval_steps > 0, "train.eval_steps", "must be > 0 or null")
    _need(0 <= t.seed < 2**32, "train.seed", "must be >= 0 and below 2**32 (numpy's seed range), e.g. 42")
    _need(t.method in ("sft", "dpo"), "train.method", "must be sft or dpo")
    _need(
        t.neftune_noise_alpha is None or t.neftune_noise_alpha > 0,
        "train.neftune_noise_alpha",
        "must be > 0 (the NEFTune paper uses 5 to 15) or null to turn it off",
    )


def _check_dpo(recipe: Recipe) -> None:
    t = recipe.train
    _need(recipe.dpo.beta > 0, "dpo.beta", "must be > 0, e.g. 0.1")
    _need(recipe.dpo.loss_type in DPO_LOSSES, "dpo.loss_type", f"must be one of {', '.join(DPO_LOSSES)}")
    _need(
        0 < recipe.dpo.max_prompt_length < t.max_length,
        "dpo.max_prompt_length",
        f"must be > 0 and below train.max_length ({t.max_length}) to leave room for the answer",
    )
    _need(not t.packing, "train.packing", "applies to SFT only: DPO compares whole answers; set it to false")
    # TRL documents NEFTune for SFT only. transformers' hook would fire in DPO too, and TRL's reference pass (the
    # adapter copy, run in train mode) would get noisy log-probs as well.
    _need(
        t.neftune_noise_alpha is None,
        "train.neftune_noise_alpha",
        "applies to SFT only (in DPO it would noise the reference model's log-probs too): set it to null",
    )


def _check_levers(t: TrainSection) -> None:
    _need(t.skip_checkpoint_layers >= 0, "train.skip_checkpoint_layers", "must be >= 0 (0 checkpoints every layer)")
    for key, on in (("reuse_dequantized", t.reuse_dequantized), ("skip_checkpoint_layers", t.skip_checkpoint_layers)):
        _need(
            not on or t.gradient_checkpointing,
            f"train.{key}",
            "acts on checkpointed layers only: set train.gradient_checkpointing=true, or turn it off",
        )
    _need(t.router_aux_loss_coef >= 0, "train.router_aux_loss_coef", "must be >= 0 (0 turns it off), e.g. 0.01")


def _check_logging(g: LoggingSection) -> None:
    _need(
        set(g.report_to) <= {"wandb", "tensorboard", "none"} and len(g.report_to) > 0,
        "logging.report_to",
        f"must list wandb, tensorboard or none, e.g. [wandb, tensorboard]; got {list(g.report_to)}",
    )
    _need("none" not in g.report_to or len(g.report_to) == 1, "logging.report_to", "cannot combine none with others")
    _need(g.router_stats_steps >= 0, "logging.router_stats_steps", "must be >= 0 (0 turns telemetry off), e.g. 10")


def _check_hub(h: HubSection) -> None:
    _need(
        not h.push or h.repo_id is not None, "hub.repo_id", "is required when hub.push is true: e.g. my-org/mixtral-sft"
    )
    _need(
        h.repo_id is None or is_repo_id(h.repo_id),
        "hub.repo_id",
        f"must be ORG/NAME (letters, digits, '-', '_', '.'), e.g. my-org/mixtral-sft; got '{h.repo_id}'",
    )


def is_repo_id(repo_id: str | None) -> bool:
    """ORG/NAME, and huggingface_hub's own rule (ASCII, at most 96 characters, no '..', '--' or '.git' ending).

    The one test of a Hub id: hub.repo_id at validation and at push (a push never refuses after training what the
    recipe accepted), model.name (a Hub id, or a missing folder), the base an adapter records, the card's metadata.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not (isinstance(repo_id, str) and HUB_REPO_ID.match(repo_id)):
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def known_formats(method: str) -> tuple[str, ...]:
    """The data.format values a method reads: conversations for SFT, preference pairs for DPO."""
    return ("auto", *(PREFERENCE_FORMATS if method == "dpo" else SFT_FORMATS))


def _check_sources(recipe: Recipe) -> None:
    d = recipe.data
    if d.path is not None and d.mixture:
        raise UserError(
            "'data.path' and 'data.mixture' are mutually exclusive: keep one (each mixture entry has its own path)"
        )
    if d.path is None and not d.mixture:
        raise UserError("missing required key 'data.path': add it to the recipe, or list sources in 'data.mixture'")
    _need(d.mixture_size is None or d.mixture, "data.mixture_size", "applies to data.mixture only: remove it")
    _need(d.mixture_size is None or d.mixture_size > 0, "data.mixture_size", "must be > 0 or null")
    # Its row index is built in memory (8 bytes a row); 10**8 rows of 2k tokens would train for years on one node.
    _need(d.mixture_size is None or d.mixture_size <= MAX_MIXTURE_ROWS, "data.mixture_size", "must be at most 10**8")
    _need(
        not d.mixture or (d.split == "train" and d.eval_split is None),
        "data.split",
        "and data.eval_split do not apply to a mixture: set split / eval_split on each data.mixture entry",
    )
    known = known_formats(recipe.train.method)
    for i, source in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        _need(source.weight > 0, f"{key}.weight", "must be > 0, e.g. 1.0")
        _need(
            source.format is None or source.format in known,
            f"{key}.format",
            f"must be null (data.format) or one of {', '.join(known)}",
        )
        _need(source.max_rows is None or source.max_rows > 0, f"{key}.max_rows", "must be > 0 or null")


def _need(ok: bool, key: str, fix: str) -> None:
    if not ok:
        raise UserError(f"'{key}' {fix}")


def check_trainer_names(recipe: Recipe) -> None:
    """train.optim and train.lr_scheduler_type against the installed transformers. Called by `train` before the
    model loads (transformers would otherwise raise a traceback after it); not by load_recipe, which stays light."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, value, names in (
        ("train.optim", recipe.train.optim, OptimizerNames),
        ("train.lr_scheduler_type", recipe.train.lr_scheduler_type, SchedulerType),
    ):
        valid = [n.value for n in names]
        close = [n for n in valid if n.startswith(value)][:3] or difflib.get_close_matches(value, valid, n=3)
        _need(value in valid, key, f"must be a transformers name, e.g. {', '.join(close or valid[:5])}; got '{value}'")
