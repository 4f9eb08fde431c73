"""What a training run shows and leaves behind: log lines with numbers as numbers, our model card in the
output folder (not TRL's default), and a closing line that names every file written, grouped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import ProgressCallback

GROUPS = (  # (group, file names or glob patterns), in the order the closing line lists them
    ("adapter", ("adapter_model.safetensors", "adapter_config.json")),
    ("tokenizer", ("tokenizer.model.v*", "tekken.json", "tokenizer_config.json")),
    ("run", ("README.md", "recipe.yaml", "run.json", "audit.json", "data_report.json")),
    ("plots", ("*.png",)),
    ("telemetry", ("router_stats.jsonl",)),
    ("checkpoints", ("checkpoint-*",)),
)


def number(value):
    """A float at 4 significant digits that still prints as a number (transformers prints '11.65', a string).

    From 10,000 up the whole number: counts are floats in the log (TRL's `num_tokens`), and a long run's
    12,345,678 tokens at 4 digits would print as an exact-looking 12350000.0.
    """
    if not isinstance(value, float):
        return value
    return round(value) if math.isfinite(value) and abs(value) >= 1e4 else float(f"{value:.4g}")


class NumericProgress(ProgressCallback):
    """transformers' progress bar, but the log line keeps numbers as numbers: {'loss': 11.65, ...}."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            shown = {k: number(v) for k, v in (logs or {}).items() if k != "total_flos"}
            self.training_bar.write(str(shown))


def use_numeric_progress(handler) -> None:
    """Swap the Trainer's ProgressCallback (its bar and log printer) for NumericProgress, in place."""
    for i, callback in enumerate(handler.callbacks):
        if type(callback) is ProgressCallback:
            handler.callbacks[i] = NumericProgress(max_str_len=callback.max_str_len)


def write_run_files(out: Path, audit, reports) -> None:
    """audit.json, data_report.json, then README.md: our card, over the one peft's save_pretrained wrote."""
    from mixtral_ft.train.card import write_card

    (out / "audit.json").write_text(audit.to_json() + "\n")
    rows = [
        {
            "source": r.source,
            "format": r.format,
            "read": r.read,
            "kept": r.kept,
            "held_out": r.held_out,
            "dropped": r.dropped,
            "supervised_tokens": r.supervised_tokens,
            "trailing_user_dropped": r.trailing_user_dropped,
            "line": r.line(),
        }
        for r in reports
    ]
    (out / "data_report.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_card(out, "adapter", ref=str(out))


def written_files(out: Path) -> dict[str, list[str]]:
    """The output folder's files by group (the closing line's content)."""
    seen: set[str] = set()
    groups: dict[str, list[str]] = {}
    for group, patterns in GROUPS:
        names = sorted(
            {p.name for pattern in patterns for p in out.glob(pattern)} - seen,
            key=lambda n: (len(n), n) if group == "checkpoints" else n,
        )
        seen.update(names)
        if names:
            groups[group] = names
    others = sorted(
        p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in seen and not p.name.startswith(".")
    )
    if others:
        groups["other"] = others
    return groups


def closing_line(out: Path) -> str:
    groups = "; ".join(f"{group}: {', '.join(names)}" for group, names in written_files(out).items())
    line = f"saved to {out}: {groups}"
    if any((out / "wandb").glob("offline-run-*")):  # wandb, quiet (quiet.py), no longer says how to upload them
        line += f"\nwandb runs offline: upload them with `wandb sync {out / 'wandb'}/offline-run-*`"
    return line
