"""DPO on pre-tokenized pairs: our one override of TRL's data path, and the reward summary for run.json.

We hand TRL our LoRA-wrapped PeftModel with `ref_model=None` and no `peft_config` (given a peft_config TRL
would wrap the model itself; alignment-handbook's QLoRA DPO recipe fails on "You passed both a ref_model and
a peft_config"). TRL then keeps the reference as a frozen copy of the starting adapter, named "ref", and gets
reference log-probs by switching to it: the reference is the policy DPO starts from (the base model for a
fresh adapter, the SFT model when `model.adapter` continues an SFT run), held as one LoRA-sized copy.

TRL's DPOTrainer has no path for pre-tokenized pairs: it always re-renders them through
`apply_chat_template`, which MistralCommonBackend cannot do for a pair. `_prepare_dataset` is overridden to
take data/prefs.py's Mixtral-format ids as they are. Checked against TRL 1.16 (pyproject pins that minor);
tests/train/test_dpo.py fails loudly if the private signature or its call site changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import TrainerCallback
from trl import DPOTrainer

from mixtral_ft.data.prefs import PAIR_COLUMNS
from mixtral_ft.train.trl_trainers import OwnModelCard

TRL_CHECKED = "1.16"  # the TRL minor this override was read against
REF_ADAPTER = "ref"  # the name TRL gives its frozen copy of the starting adapter
REWARD_KEYS = {
    "accuracy": "rewards/accuracies",
    "margin": "rewards/margins",
    "chosen": "rewards/chosen",
    "rejected": "rewards/rejected",
}


class TokenizedDPOTrainer(OwnModelCard, DPOTrainer):
    """TRL's DPOTrainer, fed with rows that data/prefs.py already tokenized and cut to max_length (and without
    TRL's draft card: trl_trainers.py)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
        if missing:
            raise TypeError(f"DPO rows must come tokenized from mixtral_ft.data.prefs (missing {missing})")
        return dataset


def drop_reference_copy(folder: str | Path) -> None:
    """peft saves every adapter, so TRL's frozen "ref" copy lands in FOLDER/ref/: only the trained one is ours.

    TRL rebuilds the copy from the starting adapter when a run starts or resumes, so nothing needs it on disk.
    """
    shutil.rmtree(Path(folder) / REF_ADAPTER, ignore_errors=True)


class DropReferenceCopy(TrainerCallback):
    """Keeps checkpoints to the trained adapter (see drop_reference_copy); runs before other on_save callbacks."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            drop_reference_copy(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def dpo_summary(history: list[dict]) -> dict:
    """Reward accuracy, margin and rewards for run.json: the last logged values, per-step values, last eval."""
    logged = [h for h in history if REWARD_KEYS["margin"] in h]
    rewards = [{"step": h["step"], **{k: h[key] for k, key in REWARD_KEYS.items()}} for h in logged]
    last = rewards[-1] if rewards else {}
    summary = {f"reward_{k}": last.get(k) for k in REWARD_KEYS}
    summary["rewards"] = rewards
    evals = [h for h in history if f"eval_{REWARD_KEYS['margin']}" in h]
    if evals:
        summary["eval_rewards"] = {
            "step": evals[-1]["step"],
            **{k: evals[-1][f"eval_{key}"] for k, key in REWARD_KEYS.items()},
        }
    return summary
