"""The recipe: one YAML file per run, checked strictly before anything heavy happens.

Each section is a frozen dataclass; the comment beside each field is its documentation (README's recipe
reference repeats it, and a test keeps the two complete). The generic strict parsing lives in schema.py;
this module holds the sections and the rules that tie their values together. `load_recipe(path, overrides)`
applies `dotted.key=value` overrides (values parsed as YAML) and raises `UserError` naming the offending key
and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixtral_ft.recipe.rules import (
    ATTENTION_TARGETS,
    check_recipe,
)
from mixtral_ft.recipe.schema import apply_override, build_dataclass, plain, read_yaml, reject_secrets


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
    num_proc: int | None = None  # processes that tokenize; null: by the rows and cores (data/encode.py)
    # Blend sources instead of data.path: seeded sampling, each source gets weight/sum(weights) of the rows.
    mixture: tuple[MixtureSource, ...] = ()  # [{path, weight, split, eval_split, format, max_rows}, ...]
    mixture_size: int | None = None  # rows in the mixed train set; null: the sum of the sources' usable rows


@dataclass(frozen=True)
class LoraSection:
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA input; 0 is faster. SFT only: TRL's DPO turns dropout off
    target_modules: tuple[str, ...] = ATTENTION_TARGETS  # attention projections to adapt
    allow_other_targets: bool = False  # allow targets outside q/k/v/o_proj (e.g. embed_tokens; README: which)
    use_rslora: bool = False  # rank-stabilized LoRA (peft): scale = alpha / sqrt(r) instead of alpha / r


@dataclass(frozen=True)
class TrainSection:
    output_dir: str  # where the adapter, tokenizer, recipe.yaml and run.json are written
    method: str = "sft"  # sft (conversations) | dpo (preference pairs; settings in the dpo section)
    max_steps: int = -1  # optimizer steps; -1 runs `num_train_epochs` epochs
    num_train_epochs: float = 1.0  # used when max_steps is -1
    save_steps: int = 500  # checkpoint every N steps
    save_total_limit: int | None = None  # keep only the newest N checkpoints (at least 2); null keeps them all
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
    # Speed levers benchmarks/NOTES.md measures (mixtral-ft bench); off, training is as before.
    reuse_dequantized: bool = False  # NF4 experts: backward reuses the recompute's bf16 weights (needs checkpointing)
    skip_checkpoint_layers: int = 0  # the last N decoder layers keep their activations: no recompute (more memory)
    liger: bool = False  # liger-kernel RMSNorm and RoPE kernels (CUDA GPU and the liger-kernel package)
    assistant_only_loss: bool = True  # loss on assistant turns (and their </s>) only
    logging_steps: int = 1  # log every N steps
    eval_steps: int | None = None  # evaluate every N steps when there is eval data; null: every save_steps
    overwrite: bool = False  # replace a finished run in output_dir (otherwise that is an error)
    check_fit: bool = True  # stop before any download if the model cannot train here (no CUDA GPU, or plan: no fit)
    resume: str | bool = "auto"  # auto (newest complete checkpoint, else fresh) | true (must resume) | false | PATH
    router_aux_loss_coef: float = 0.0  # MoE load-balancing loss weight (padding excluded); 0 = off, e.g. 0.01
    neftune_noise_alpha: float | None = None  # SFT only: NEFTune noise on the input embeddings, e.g. 5; null = off


@dataclass(frozen=True)
class HubSection:
    push: bool = False  # push the adapter to the Hub when training ends (token: HF_TOKEN or `hf auth login`)
    repo_id: str | None = None  # ORG/NAME of the Hub repo; required when push is true
    private: bool = True  # create the repo private (applies only when the repo is created)


@dataclass(frozen=True)
class DpoSection:  # used when train.method is dpo; train.max_length caps prompt + answer
    beta: float = 0.1  # pull towards the reference model (the starting policy): higher stays closer
    loss_type: str = "sigmoid"  # TRL DPO loss: sigmoid (the DPO paper), ipo, hinge, apo_zero, ...
    max_prompt_length: int = 512  # over train.max_length: old turns go first, then the question's start


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


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
