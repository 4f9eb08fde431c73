"""The recipe: one YAML file per run, checked strictly before anything heavy happens.

Each section is a frozen dataclass; the comment beside each field is its documentation (README's recipe
reference repeats it, and a test keeps the two complete). The generic strict parsing lives in schema.py;
this module holds the sections and the rules that tie their values together. `load_recipe(path, overrides)` applies `dotted.key=value`
overrides (values parsed as YAML) and raises `UserError` naming the offending key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixtral_ft.errors import UserError
from mixtral_ft.recipe.schema import apply_override, build_dataclass, plain, read_yaml, reject_secrets

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SFT_FORMATS = ("messages", "sharegpt", "chatml", "alpaca", "prompt_completion")  # data.format (data/formats.py)
PREFERENCE_FORMATS = ("preference", "implicit_prompt")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
# TRL 1.16's DPO losses that need no setting beyond beta (exo_pair and robust need label smoothing; sft is
# not a preference loss).
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSection:
    name: str  # hub id (mistralai/Mixtral-8x7B-v0.1), local folder, or `tiny` (built-in random model)
    quantize_experts: bool = True  # NF4 experts; false keeps them bf16 (needs ~90 GB, e.g. an H200)
    compute_dtype: str = "auto"  # auto (bf16/fp16 on a CUDA GPU, fp32 on a CPU) | bfloat16 | float16 | float32
    revision: str | None = None  # hub revision (branch, tag or commit) for a hub id
    adapter: str | None = None  # existing LoRA adapter folder to keep training (SFT -> DPO chains)
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (CUDA + flash-attn package) | eager


@dataclass(frozen=True)
class MixtureSource:
    path: str  # like data.path: file, folder, hub dataset id or builtin:NAME
    weight: float = 1.0  # share of the mixed train set (weights are normalized to fractions)
    split: str = "train"  # split to sample from
    eval_split: str | None = None  # this source's eval split; null: hold out data.test_size of its rows
    format: str | None = None  # null: data.format
    max_rows: int | None = None  # null: data.max_rows


@dataclass(frozen=True)
class DataSection:
    path: str | None = None  # local .jsonl/.json/.parquet, hub dataset id, builtin:oasst_top1 or builtin:preferences
    split: str = "train"  # split to train on (local files have only `train`)
    eval_split: str | None = None  # split to evaluate on, e.g. `test`; null for none
    test_size: float = 0.0  # fraction of rows held out for eval when the source has no eval split
    # auto | messages | sharegpt | chatml | alpaca | prompt_completion (SFT) | preference | implicit_prompt (DPO)
    format: str = "auto"  # auto detects it from the columns; README's Data section shows one row of each
    max_bad_fraction: float = 0.1  # stop the run if more than this fraction of rows is unparseable
    max_rows: int | None = None  # read at most this many rows (quick experiments)
    # Blend sources instead of data.path: seeded sampling, each source gets weight/sum(weights) of the rows.
    mixture: tuple[MixtureSource, ...] = ()  # [{path, weight, split, eval_split, format, max_rows}, ...]
    mixture_size: int | None = None  # rows in the mixed train set; null: the sum of the sources' usable rows


@dataclass(frozen=True)
class LoraSection:
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA input; 0 is faster
    target_modules: tuple[str, ...] = ATTENTION_TARGETS  # attention projections to adapt
    allow_other_targets: bool = False  # allow targets outside q/k/v/o_proj (router and experts stay frozen)


@dataclass(frozen=True)
class TrainSection:
    output_dir: str  # where the adapter, tokenizer, recipe.yaml and run.json are written
    method: str = "sft"  # sft (conversations) | dpo (preference pairs; settings in the dpo section)
    max_steps: int = -1  # optimizer steps; -1 runs `num_train_epochs` epochs
    num_train_epochs: float = 1.0  # used when max_steps is -1
    save_steps: int = 500  # checkpoint every N steps
    seed: int = 42  # seeds python, numpy, torch and data shuffling
    learning_rate: float = 2e-4  # peak learning rate
    lr_scheduler_type: str = "cosine"  # transformers scheduler name
    warmup_ratio: float = 0.03  # fraction of steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 0.3  # gradient clipping (QLoRA paper value)
    optim: str = "adamw_torch"  # transformers optimizer name (paged_adamw_8bit saves memory on GPU)
    per_device_train_batch_size: int = 2  # micro-batch per GPU
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_length: int = 2048  # tokens per row; longer conversations are truncated (DPO: prompt + answer)
    packing: bool = False  # pack rows into full max_length sequences
    gradient_checkpointing: bool = True  # recompute activations in backward to save memory
    compile: bool = False  # torch.compile each decoder layer (one graph for all; speed: benchmarks/NOTES.md)
    assistant_only_loss: bool = True  # loss on assistant turns (and their </s>) only
    logging_steps: int = 1  # log every N steps
    eval_steps: int | None = None  # evaluate every N steps when there is eval data; null: every save_steps (not with compile)
    overwrite: bool = False  # replace a finished run in output_dir (otherwise that is an error)
    check_fit: bool = True  # stop before any download if the model cannot train here (no CUDA GPU, or plan: no fit)
    resume: str | bool = "auto"  # auto (newest complete checkpoint, else fresh) | true (must resume) | false | PATH
    router_aux_loss_coef: float = 0.0  # MoE load-balancing loss weight (padding excluded); 0 = off, e.g. 0.01


@dataclass(frozen=True)
class HubSection:
    push: bool = False  # push the adapter to the Hub when training ends (token: HF_TOKEN or `huggingface-cli login`)
    repo_id: str | None = None  # ORG/NAME of the Hub repo; required when push is true
    private: bool = True  # create the repo private (applies only when the repo is created)


@dataclass(frozen=True)
class DpoSection:  # used when train.method is dpo; train.max_length caps prompt + answer
    beta: float = 0.1  # pull towards the reference model (the starting policy): higher stays closer
    loss_type: str = "sigmoid"  # TRL DPO loss: sigmoid (the DPO paper), ipo, hinge, apo_zero, ...
    max_prompt_length: int = 512  # if prompt + answer exceed train.max_length: the prompt keeps <s> and its end


@dataclass(frozen=True)
class LoggingSection:
    report_to: tuple[str, ...] = ("none",)  # any of wandb, tensorboard; none for neither (wandb: offline without a key)
    project: str = "mixtral-ft"  # wandb project
    run_name: str | None = None  # wandb / tensorboard run name; null: the output_dir folder name
    router_stats_steps: int = 10  # router telemetry (router_stats.jsonl) every N steps; 0 turns it off


@dataclass(frozen=True)
class Recipe:
    model: ModelSection
    data: DataSection
    train: TrainSection
    lora: LoraSection = field(default_factory=LoraSection)
    hub: HubSection = field(default_factory=HubSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


# --- parsing -----------------------------------------------------------------------------------

def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return build_recipe(raw)


def build_recipe(raw: dict[str, Any]) -> Recipe:
    reject_secrets(raw, "")
    recipe = build_dataclass(Recipe, raw, "")
    check_recipe(recipe)
    return recipe


# --- range and consistency checks ----------------------------------------------------------------

def check_recipe(recipe: Recipe) -> None:
    m, d, lo, t = recipe.model, recipe.data, recipe.lora, recipe.train
    _need(m.compute_dtype in ("auto", "bfloat16", "float16", "float32"), "model.compute_dtype",
          "must be auto, bfloat16, float16 or float32")
    _need(m.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
          "must be sdpa, flash_attention_2 or eager")
    known = ("auto", *(PREFERENCE_FORMATS if t.method == "dpo" else SFT_FORMATS))
    _need(d.format in known, "data.format", f"must be one of {', '.join(known)} (train.method: {t.method})")
    _check_sources(recipe)
    _need(0.0 <= d.test_size < 1.0, "data.test_size", "must be in [0, 1), e.g. 0.05")
    _need(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1], e.g. 0.1")
    _need(d.max_rows is None or d.max_rows > 0, "data.max_rows", "must be > 0 or null")
    _need(lo.r > 0, "lora.r", "must be > 0, e.g. 16")
    _need(lo.alpha > 0, "lora.alpha", "must be > 0, e.g. 32 (twice r)")
    _need(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1), e.g. 0.05")
    _need(len(lo.target_modules) > 0, "lora.target_modules", "must name at least one of q_proj, k_proj, v_proj, o_proj")
    others = [x for x in lo.target_modules if x not in ATTENTION_TARGETS]
    _need(not others or lo.allow_other_targets, "lora.target_modules",
          f"has {others}: only {list(ATTENTION_TARGETS)} are supported (router and experts stay frozen); "
          "set lora.allow_other_targets: true to override")
    _need(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", "must be > 0, or -1 to train by epochs")
    _need(t.num_train_epochs > 0, "train.num_train_epochs", "must be > 0")
    _need(t.save_steps > 0, "train.save_steps", "must be > 0, e.g. 500")
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
    if t.method == "dpo":
        _need(recipe.dpo.beta > 0, "dpo.beta", "must be > 0, e.g. 0.1")
        _need(recipe.dpo.loss_type in DPO_LOSSES, "dpo.loss_type", f"must be one of {', '.join(DPO_LOSSES)}")
        _need(0 < recipe.dpo.max_prompt_length < t.max_length, "dpo.max_prompt_length",
              f"must be > 0 and below train.max_length ({t.max_length}) to leave room for the answer")
        _need(not t.packing, "train.packing", "applies to SFT only: DPO compares whole answers; set it to false")
    _need(t.router_aux_loss_coef >= 0, "train.router_aux_loss_coef", "must be >= 0 (0 turns it off), e.g. 0.01")
    g = recipe.logging
    _need(set(g.report_to) <= {"wandb", "tensorboard", "none"} and len(g.report_to) > 0, "logging.report_to",
          f"must list wandb, tensorboard or none, e.g. [wandb, tensorboard]; got {list(g.report_to)}")
    _need("none" not in g.report_to or len(g.report_to) == 1, "logging.report_to", "cannot combine none with others")
    _need(g.router_stats_steps >= 0, "logging.router_stats_steps", "must be >= 0 (0 turns telemetry off), e.g. 10")
    h = recipe.hub
    _need(not h.push or h.repo_id is not None, "hub.repo_id", "is required when hub.push is true: e.g. my-org/mixtral-sft")
    _need(h.repo_id is None or is_repo_id(h.repo_id), "hub.repo_id",
          f"must be ORG/NAME (letters, digits, '-', '_', '.'), e.g. my-org/mixtral-sft; got '{h.repo_id}'")


def is_repo_id(repo_id: str | None) -> bool:
    """ORG/NAME, and huggingface_hub's own rule ('..', '--', a '.git' ending): checked at validation and at push,
    so a push never refuses after training what the recipe accepted."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not (repo_id and HUB_REPO_ID.match(repo_id)):
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _check_sources(recipe: Recipe) -> None:
    d = recipe.data
    if d.path is not None and d.mixture:
        raise UserError("'data.path' and 'data.mixture' are mutually exclusive: keep one (each mixture entry "
                        "has its own path)")
    if d.path is None and not d.mixture:
        raise UserError("missing required key 'data.path': add it to the recipe, or list sources in 'data.mixture'")
    _need(d.mixture_size is None or d.mixture, "data.mixture_size", "applies to data.mixture only: remove it")
    _need(d.mixture_size is None or d.mixture_size > 0, "data.mixture_size", "must be > 0 or null")
    _need(not d.mixture or (d.split == "train" and d.eval_split is None), "data.split",
          "and data.eval_split do not apply to a mixture: set split / eval_split on each data.mixture entry")
    for i, source in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        _need(source.weight > 0, f"{key}.weight", "must be > 0, e.g. 1.0")
        known = ("auto", *(PREFERENCE_FORMATS if recipe.train.method == "dpo" else SFT_FORMATS))
        _need(source.format is None or source.format in known, f"{key}.format",
              f"must be null (data.format) or one of {', '.join(known)}")
        _need(source.max_rows is None or source.max_rows > 0, f"{key}.max_rows", "must be > 0 or null")


def _need(ok: bool, key: str, fix: str) -> None:
    if not ok:
        raise UserError(f"'{key}' {fix}")


def check_trainer_names(recipe: Recipe) -> None:
    """train.optim and train.lr_scheduler_type against the installed transformers. Called by `train` before the
    model loads (transformers would otherwise raise a traceback after it); not by load_recipe, which stays light."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, value, names in (("train.optim", recipe.train.optim, OptimizerNames),
                              ("train.lr_scheduler_type", recipe.train.lr_scheduler_type, SchedulerType)):
        valid = [n.value for n in names]
        close = [n for n in valid if n.startswith(value)][:3] or difflib.get_close_matches(value, valid, n=3)
        _need(value in valid, key, f"must be a transformers name, e.g. {', '.join(close or valid[:5])}; got '{value}'")


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
