"""End-of-run plots (matplotlib, Agg): the loss curve and the router's layers x experts load heatmap, drawn by the
`RunPlots` callback when training ends.

Both read what the run already wrote (the Trainer's log history, router_stats.jsonl), so they can be
redrawn from a finished output dir: `plot_router_heatmap(out / "router_stats.jsonl", out / "x.png")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: training machines have no display
    import matplotlib.pyplot as plt

    return plt


SMOOTH_FROM = 200  # logged losses; past this a long run's per-step noise paints a solid band
MARKERS_UP_TO = 40  # eval points drawn as dots; more run together


def smoothed(values: list[float]) -> list[float]:
    """Exponential moving average over about 1/50 of the points (as TensorBoard's smoothing slider does)."""
    weight = 1 - 50 / max(len(values), 50)
    out, level = [], values[0]
    for value in values:
        level = weight * level + (1 - weight) * value
        out.append(level)
    return out


def loss_lines(log_history: list[dict]) -> list[tuple[list, list, dict]]:
    """(steps, losses, matplotlib style) for each line of the loss plot."""
    train = [(h["step"], h["loss"]) for h in log_history if isinstance(h.get("loss"), (int, float))]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if isinstance(h.get("eval_loss"), (int, float))]
    lines = []
    if len(train) > SMOOTH_FROM:
        steps, losses = map(list, zip(*train))
        lines.append((steps, losses, {"color": "C0", "alpha": 0.25, "linewidth": 0.5}))
        lines.append((steps, smoothed(losses), {"color": "C0", "label": "train loss (smoothed)"}))
    elif train:
        lines.append((*map(list, zip(*train)), {"color": "C0", "label": "train loss"}))
    if evals:
        marker = "o" if len(evals) <= MARKERS_UP_TO else None
        lines.append(
            (*map(list, zip(*evals)), {"color": "C1", "linestyle": "--", "marker": marker, "label": "eval loss"})
        )
    return lines


def plot_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    lines = loss_lines(log_history)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for steps, losses, style in lines:
        ax.plot(steps, losses, **style)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def first_and_last(stats_path: Path) -> tuple[dict, dict] | None:
    """The first and last records of a JSONL file (the same one if it holds one), None if it holds none.

    Read line by line and only those two parsed: a long run's router_stats.jsonl has a record every
    `router_stats_steps` steps (Mixtral, 50k steps at every 10: 5,000 records, 20 MB), and parsing them all cost
    1.5 s and 120 MB at the end of the run for two of them.
    """
    first = last = None
    count = 0
    with stats_path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                first, last, count = first or line, line, count + 1
    if not count:
        return None
    head = json.loads(first)
    return head, head if count == 1 else json.loads(last)


def plot_router_heatmap(stats_path: Path, path: Path) -> Path | None:
    """Layers x experts load at the baseline and the last record, and their difference."""
    ends = first_and_last(stats_path) if stats_path.is_file() else None
    if ends is None:
        return None
    first, last = ends
    loads = [torch.tensor(first["expert_fraction"]), torch.tensor(last["expert_fraction"])]
    layers, experts = loads[0].shape
    plt = _pyplot()
    panels = [
        (loads[0], f"expert load, step {first['step']}"),
        (loads[1], f"expert load, step {last['step']}"),
        (loads[1] - loads[0], "change"),
    ][: 1 if first is last else 3]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.2 + 2.6 * len(panels), 1.4 + 0.22 * max(layers, 4)), dpi=100, squeeze=False
    )
    top = float(max(x.max() for x in loads))
    for ax, (data, title) in zip(axes[0], panels):
        change = title == "change"
        span = float(data.abs().max()) or 1e-3
        image = ax.imshow(
            data,
            aspect="auto",
            cmap="RdBu_r" if change else "viridis",
            vmin=-span if change else 0.0,
            vmax=span if change else top,
        )
        ax.set(title=title, xlabel="expert", ylabel="layer", xticks=range(experts))
        if layers * experts <= 64:  # small grids: print the numbers too
            for (i, j), v in zip(((i, j) for i in range(layers) for j in range(experts)), data.flatten().tolist()):
                dark = abs(v) > 0.5 * span if change else v < 0.6 * top  # viridis is dark low, RdBu at both ends
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(f"share of routed tokens per expert (uniform = {1 / experts:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class RunPlots(TrainerCallback):
    """When training ends: loss_curve.png and router_heatmap.png in the output dir, and to wandb if on."""

    def __init__(self, output_dir: str | Path):
        self.out = Path(output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        try:
            images = {
                "loss_curve": plot_loss_curve(state.log_history, self.out / "loss_curve.png"),
                "router_heatmap": plot_router_heatmap(self.out / "router_stats.jsonl", self.out / "router_heatmap.png"),
            }
        except Exception as exc:  # the adapter is saved after this: a plot must never cost a finished run
            print(f"warning: could not draw the run's plots ({type(exc).__name__}: {exc})", flush=True)
            images = {}
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log(
                    {f"plots/{k}": wandb.Image(str(v)) for k, v in images.items() if v}
                    | {"train/global_step": state.global_step}
                )
                # Runs here after WandbCallback.on_train_end (it never finishes the run). Finishing completes the
                # offline run's files and lets the next run in this process (an SFT -> DPO chain) start its own.
                wandb.finish()
