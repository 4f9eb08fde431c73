"""Router telemetry, throughput and end-of-run plots, as Trainer callbacks (SFT, DPO, any HF Trainer).

Attention-only LoRA freezes the router's weights, not its inputs: the hidden states it reads come out of
the attention being trained, so expert load can still drift or collapse. `RouterTelemetry` measures it.
On step 1 (the untouched model: the baseline), every `every` steps and on the last step, for each layer:
the fraction of real (non-padding) tokens routed to each expert (top-k assignments), the router's
entropy (nats; ln E at uniform), the Switch load-balancing loss (top_k at perfect balance) and the change
since the baseline. Records go to `router_stats.jsonl`; four aggregates go to the trainer's log, hence to
wandb and tensorboard. `Throughput` adds tokens/s to the log and the progress bar. `plots.RunPlots` draws
`loss_curve.png` and `router_heatmap.png` when training ends (and logs them to wandb).
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from time import perf_counter

import torch
from transformers import ProgressCallback, TrainerCallback

from mixtral_ft.common import distributed_initialized
from mixtral_ft.train.carry import paused_seconds
from mixtral_ft.train.plots import RunPlots

ROUTER_NAME = re.compile(r"^(?:(?P<backbone>.*)\.)?layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.gate$")


# --- statistics ----------------------------------------------------------------------------------


def routing_sums(logits: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's sums over real tokens: [top-k counts (E), router probs (E), entropy, tokens].

    `logits` [T, E] and `indices` [T, k] are a router's outputs for T flattened tokens; `mask` has T
    elements, 0 for padding. Sums (not means) so micro-batches and ranks can simply be added.
    """
    num_experts, top_k = logits.shape[-1], indices.shape[-1]
    probs = logits.float().softmax(-1)
    weight = probs.new_ones(len(probs)) if mask is None else mask.reshape(-1).to(probs)
    counts = probs.new_zeros(num_experts).index_add_(0, indices.reshape(-1), weight.repeat_interleave(top_k))
    entropy = torch.special.entr(probs).sum(-1)  # entr(0) = 0, no log(0)
    return torch.cat([counts, weight @ probs, (weight @ entropy)[None], weight.sum()[None]])


def layer_stats(sums: torch.Tensor) -> dict[str, float | list[float]]:
    """Fractions, mean entropy and load-balancing loss from `routing_sums` (summed over any batches)."""
    sums = sums.double()
    num_experts = (len(sums) - 2) // 2
    counts, probs, entropy, tokens = sums[:num_experts], sums[num_experts:-2], sums[-2], sums[-1].clamp(min=1)
    # transformers' load_balancing_loss_func for one layer: E * sum(top-k share per token * mean router prob).
    lb_loss = num_experts * torch.sum((counts / tokens) * (probs / tokens))
    return {
        "fraction": (counts / counts.sum().clamp(min=1)).tolist(),
        "entropy": float(entropy / tokens),
        "lb_loss": float(lb_loss),
    }


def find_routers(model: torch.nn.Module) -> tuple[torch.nn.Module | None, dict[int, torch.nn.Module]]:
    """The decoder backbone (the module owning `layers`) and each layer's router, by layer index."""
    backbone, routers = None, {}
    for name, module in model.named_modules():
        match = ROUTER_NAME.match(name)
        if match:
            routers[int(match["layer"])] = module
            backbone = backbone or model.get_submodule(match["backbone"] or "")
    return backbone, dict(sorted(routers.items()))


# --- callbacks -----------------------------------------------------------------------------------


class RouterTelemetry(TrainerCallback):
    """Per-layer expert load, entropy and load-balancing loss of training forwards, every `every` steps."""

    log_first = True  # adds to `logs`: attach() moves it ahead of the reporters

    def __init__(self, output_dir: str | Path, every: int = 10):
        self.path = Path(output_dir) / "router_stats.jsonl"
        self.every = every
        self.handles: list = []
        self.router_handles: list = []
        self.compiled = False
        self.routers: dict[int, torch.nn.Module] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.due = self.counting = False
        self.seen: set[int] = set()
        self.mask: torch.Tensor | None = None
        self.baseline: dict | None = None
        self.pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        backbone, self.routers = find_routers(model)
        if backbone is None:
            return
        # The backbone is called once per model forward with keyword arguments (both transformers' and TRL's
        # forwards), and is never checkpointed itself, so its pre-hook marks where a forward begins.
        self.handles = [backbone.register_forward_pre_hook(self._on_forward, with_kwargs=True)]
        self.compiled = any(getattr(layer, "_compiled_call_impl", None) for layer in getattr(backbone, "layers", []))
        if state.is_world_process_zero:
            # A resumed run keeps the records up to its checkpoint (later ones are redone) and their baseline.
            # Every record ends with a newline: the text after the last one is a record cut short by a kill or a
            # full disk, dropped with the rest past the checkpoint.
            old = self.path.read_text().split("\n")[:-1] if state.global_step and self.path.is_file() else []
            kept = [line for line in old if line.strip() and json.loads(line)["step"] <= state.global_step]
            _replace_text(self.path, "".join(line + "\n" for line in kept))
            self.baseline = json.loads(kept[0]) if kept else None

    def on_train_end(self, args, state, control, **kwargs):
        self._watch_routers(False)
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _watch_routers(self, on: bool) -> None:
        """Router hooks only on the steps that are measured.

        A hook inside a compiled, checkpointed layer is a side effect dynamo cannot trace: the whole layer would
        silently fall back to eager on every step. So the hooks exist only on measured steps, and on those the
        compiled layers run eagerly (set_stance); the other steps keep the one compiled graph.
        """
        for handle in self.router_handles:
            handle.remove()
        self.router_handles = []
        if on:
            self.router_handles = [
                router.register_forward_hook(partial(self._on_router, layer)) for layer, router in self.routers.items()
            ]
        if self.compiled:
            torch.compiler.set_stance("force_eager" if on else "default")

    def _on_forward(self, module, args, kwargs):
        # Eval forwards and DPO's reference pass run without grad; only training forwards are measured.
        self.counting = self.due and module.training and torch.is_grad_enabled()
        self.seen = set()
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _on_router(self, layer, module, args, output):
        # Gradient checkpointing re-runs every layer's forward during backward, with grad enabled (reentrant or
        # not). The first call per layer after the backbone's pre-hook is the real one; later ones are recomputes.
        if not self.counting or layer in self.seen:
            return
        self.seen.add(layer)
        if isinstance(output, tuple) and len(output) == 3:  # transformers 5: logits, top-k scores, top-k indices
            logits, _, indices = output
        else:  # a plain linear gate: logits only
            logits = output[0] if isinstance(output, tuple) else output
            indices = logits.topk(getattr(module, "top_k", 2), dim=-1).indices
        mask = self.mask if self.mask is not None and self.mask.numel() == len(logits) else None
        with torch.no_grad():
            sums = routing_sums(logits.detach(), indices, None if mask is None else mask.to(logits.device))
        self.sums[layer] = sums + self.sums[layer] if layer in self.sums else sums

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1  # the step this forward is logged under, like the loss
        self.due = bool(self.routers) and (step == 1 or step % self.every == 0 or step == state.max_steps)
        self.sums = {}
        if self.due:
            self._watch_routers(True)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.due:
            return
        self._watch_routers(False)
        self.due = self.counting = False
        weight = next(iter(self.routers.values())).weight
        table = weight.new_zeros(len(self.routers), 2 * weight.shape[0] + 2, dtype=torch.float32)
        for row, layer in enumerate(self.routers):
            if layer in self.sums:
                table[row] = self.sums[layer].to(table.device)
        if distributed_initialized():
            torch.distributed.all_reduce(table)  # every rank reaches this step, even one that saw nothing
        if table[0, -1] == 0:
            return  # no training forward this step (nothing counted on any rank)
        record = self._record(state.global_step, [layer_stats(row) for row in table.cpu()], int(table[0, -1]))
        if state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.pending = {
            "router/max_expert_load": max(max(f) for f in record["expert_fraction"]),
            "router/mean_entropy": sum(record["entropy"]) / len(record["entropy"]),
            "router/lb_loss": sum(record["lb_loss"]) / len(record["lb_loss"]),
            "router/load_shift": max(record["load_shift"]),
        }
        control.should_log = True  # log now, so the scalars land on this step in wandb and tensorboard

    def _record(self, step: int, stats: list[dict], tokens: int) -> dict:
        record = {
            "step": step,
            "tokens": tokens,
            "layers": list(self.routers),
            "expert_fraction": [[round(x, 6) for x in s["fraction"]] for s in stats],
            "entropy": [round(s["entropy"], 6) for s in stats],
            "lb_loss": [round(s["lb_loss"], 6) for s in stats],
        }
        self.baseline = self.baseline or record
        # Total variation distance of each layer's load from the baseline: 0 same, 1 disjoint experts. Each
        # record routes other tokens, so part of it is data; a run with learning_rate ~0 shows that floor.
        record["load_shift"] = [
            round(0.5 * sum(abs(a - b) for a, b in zip(now, then)), 6)
            for now, then in zip(record["expert_fraction"], self.baseline["expert_fraction"])
        ]
        record["entropy_change"] = [round(a - b, 6) for a, b in zip(record["entropy"], self.baseline["entropy"])]
        return record

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None:
            add_to_log(state, logs, self.pending)
            self.pending = {}


class Throughput(TrainerCallback):
    """Adds `tokens_per_s` (since the previous log, evaluation and saving left out: carry.py's pauses) to each log,
    and loss and tokens/s to the progress bar."""

    log_first = True
    progress: ProgressCallback | None = None  # set by attach(); its bar shows steps and ETA
    trainer = None  # set by attach(): TRL's token count, which a resume restores (carry.py)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.last is None:  # this process's first step: a resumed run's earlier tokens took no time here
            count = getattr(self.trainer, "_total_train_tokens", None)
            seen = state.num_input_tokens_seen if count is None else count
            self.last = (seen, perf_counter(), paused_seconds(self.trainer))

    def on_log(self, args, state, control, logs=None, **kwargs):
        tokens = logs.get("num_tokens", logs.get("num_input_tokens_seen"))  # TRL's count, or the Trainer's
        now = perf_counter()
        if isinstance(tokens, (int, float)) and "loss" in logs and self.last is not None:
            seen, then, paused_then = self.last
            paused = paused_seconds(self.trainer)
            trained = max(now - then - (paused - paused_then), 1e-9)
            add_to_log(state, logs, {"tokens_per_s": round((tokens - (seen or 0)) / trained, 1)})
            self.last = (tokens, now, paused)
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None and "loss" in logs:
            bar.set_postfix({"loss": f"{logs['loss']:.4g}", "tok/s": logs.get("tokens_per_s", "-")}, refresh=False)


def _replace_text(path: Path, text: str) -> None:
    # Through a new file and a rename: rewritten in place, a kill or a full disk mid-write would lose the
    # records of every step before the checkpoint, which the resumed run does not redo.
    fresh = path.with_name(path.name + ".new")
    try:
        fresh.write_text(text)
        os.replace(fresh, path)
    finally:
        fresh.unlink(missing_ok=True)


def add_to_log(state, logs: dict, values: dict) -> None:
    """Add `values` to the log being reported and to its entry in the Trainer's history (a copy of it)."""
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)


def attach(trainer) -> None:
    """Move the callbacks that add to `logs` ahead of the reporters (wandb, tensorboard, the printed line).

    The Trainer calls callbacks in order and puts its reporting integrations before the caller's, so a value
    a later callback adds to `logs` in on_log would reach none of them.
    """
    from mixtral_ft.train.outputs import use_numeric_progress

    handler = trainer.callback_handler
    use_numeric_progress(handler)  # log lines print numbers, not transformers' quoted strings
    first = [cb for cb in handler.callbacks if getattr(cb, "log_first", False)]
    handler.callbacks = first + [cb for cb in handler.callbacks if cb not in first]
    progress = next((cb for cb in handler.callbacks if isinstance(cb, ProgressCallback)), None)
    for cb in first:
        if isinstance(cb, Throughput):
            cb.progress, cb.trainer = progress, trainer


def telemetry_callbacks(recipe, output_dir: str | Path) -> list[TrainerCallback]:
    every = recipe.logging.router_stats_steps
    return [*([RouterTelemetry(output_dir, every)] if every > 0 else []), Throughput(), RunPlots(output_dir)]
