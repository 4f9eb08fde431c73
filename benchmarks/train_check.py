"""The real training path on a GPU (benchmarks/gpu_truth.py, stage `train`): `mixtral-ft train`, checkpoint, resume.

    python benchmarks/train_check.py --work DIR --out train.json            # on a GPU: 2 full-width layers
    python benchmarks/train_check.py --work DIR --out F --device cpu --small  # dry run on CPU (tiny width)

1. Writes a 2-layer Mixtral-8x7B-width random checkpoint (bf16, the Hub's per-expert layout, 6.3 GB) and the
   Mixtral tokenizer into DIR/model, drawing the weights on the device.
2. `mixtral-ft train` on it through a recipe (streaming NF4 loader, audit, TRL SFT on the bundled oasst sample,
   checkpointing every 2 steps), stopped by a real SIGTERM after its second step (a preemption), then the
   same command again, which resumes from the saved checkpoint and finishes the 5 steps.
3. Records, in --out after each step of this list: both runs' exit codes and wall times, the checkpoint, the
   losses, run.json's memory figures (load peak against the loaded footprint, training peak), the audit.
With `--set train.compile=true --once --model DIR` it trains the same checkpoint once with the speed levers on.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


def write_checkpoint(folder: Path, device: str, small: bool) -> dict:
    from mixtral_ft.model.shapes import mixtral_config, tiny_config
    from mixtral_ft.model.tiny import write_random_mixtral

    started = time.perf_counter()
    config = tiny_config() if small else mixtral_config(2)
    write_random_mixtral(folder, config, device=device)  # per-expert w1/w2/w3: the Hub's layout
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"seconds": round(time.perf_counter() - started, 1), "bytes": size, "layers": config.num_hidden_layers}


def write_recipe(work: Path, model_dir: Path, small: bool) -> Path:
    recipe = f"""# python -m mixtral_ft.cli train {work}/recipe.yaml (written by benchmarks/train_check.py)
model:
  name: {model_dir}
data:
  path: builtin:oasst_top1
  split: train
  test_size: 0
lora:
  r: 16
  alpha: 32
  dropout: 0.05
  target_modules: [q_proj, k_proj, v_proj, o_proj]
train:
  output_dir: {work}/run
  max_steps: {STEPS}
  save_steps: 2
  logging_steps: 1
  seed: 42
  learning_rate: 1.0e-4
  per_device_train_batch_size: 2
  max_length: {256 if small else 1024}
  gradient_checkpointing: true
"""
    path = work / "recipe.yaml"
    path.write_text(recipe)
    return path


def train(recipe: Path, stop_after_step: int | None, log, overrides: list[str]) -> dict:
    """One `mixtral-ft train` process; with `stop_after_step`, a SIGTERM once that step's log line is out."""
    command = [sys.executable, "-m", "mixtral_ft.cli", "train", str(recipe), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen_steps, signalled = 0, None
    while proc.poll() is None or select.select([proc.stdout], [], [], 0)[0]:
        if not select.select([proc.stdout], [], [], 1)[0]:
            continue
        line = proc.stdout.readline()
        if not line:
            break
        log.write(line)
        log.flush()
        seen_steps += line.count("'loss'")  # the Trainer prints each step's log dict on stdout
        if stop_after_step and signalled is None and seen_steps >= stop_after_step:
            proc.send_signal(signal.SIGTERM)
            signalled = seen_steps
    proc.wait()
    return {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - started, 1), "sigterm_after": signalled}


def summarize(run_dir: Path) -> dict:
    found = {"checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*"))}
    if (run_dir / "run.json").is_file():
        run = json.loads((run_dir / "run.json").read_text())
        keep = (
            "steps",
            "losses",
            "device",
            "compute_dtype",
            "tokens_per_s",
            "peak_memory_gib",
            "memory",
            "compile",
            "versions",
        )
        found["run_json"] = {k: run[k] for k in keep if k in run}
    if (run_dir / "audit.json").is_file():
        audit = json.loads((run_dir / "audit.json").read_text())
        found["audit"] = {k: audit.get(k) for k in ("ok", "failures", "expert_bytes_per_param")}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoint, recipe and run")
    parser.add_argument("--out", type=Path, required=True, help="result JSON, rewritten after each part")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny width (CPU dry run)")
    parser.add_argument("--model", type=Path, help="an existing checkpoint folder (default: write DIR/model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    parser.add_argument("--once", action="store_true", help="one uninterrupted run, no preemption and resume")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    def save(key: str, value) -> None:
        report[key] = value
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{key}: {json.dumps(value)[:800]}", flush=True)

    model_dir = args.model or args.work / "model"
    if not (model_dir / "config.json").is_file():
        save("checkpoint", write_checkpoint(model_dir, args.device, args.small))
    recipe = write_recipe(args.work, model_dir, args.small)
    save("overrides", args.set)
    with open(args.work / "train.log", "a") as log:
        if not args.once:
            save("preempted_run", train(recipe, 2, log, args.set) | summarize(args.work / "run"))
        save(
            "resumed_run" if not args.once else "run", train(recipe, None, log, args.set) | summarize(args.work / "run")
        )
    last = report["run"] if args.once else report["resumed_run"]
    steps = [e["step"] for e in last.get("run_json", {}).get("losses", [])]
    preempted = args.once or (report["preempted_run"]["exit_code"] == 143 and report["preempted_run"]["checkpoints"])
    complete = last["exit_code"] == 0 and steps == list(range(1, STEPS + 1))
    save("ok", bool(preempted and complete and last.get("audit", {}).get("ok") is True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
