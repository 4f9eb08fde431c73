"""TRL's trainers as our runs use them: the model card is ours, so TRL's per-checkpoint draft of it is skipped.

TRL's `_save_checkpoint` drafts a README.md into `output_dir` at every checkpoint. A run's card is written when
it ends (train/card.py, with the audit, data report and metrics), so the draft was only ever a stale stand-in
beside an unfinished run; and offline it asks wandb for a run URL it cannot have, printing
"wandb: WARNING URL not available in offline run" into the progress bar at every save.
"""

from __future__ import annotations

from trl import SFTTrainer


class OwnModelCard:
    """Put ahead of a TRL trainer class: `create_model_card` does nothing (our card comes at the run's end)."""

    def create_model_card(self, *args, **kwargs) -> None:
        return None


class RunSFTTrainer(OwnModelCard, SFTTrainer):
    """TRL's SFTTrainer without the draft card."""
