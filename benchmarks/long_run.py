"""What grows over a long run: memory, Python objects, per-step time and file sizes, sampled every N steps.

    python benchmarks/long_run.py --steps 1000 3000                 # two lengths, to tell linear growth from noise
    python benchmarks/long_run.py --steps 300 --sample-every 25 --tracemalloc   # + where Python memory grows

Each length trains the built-in tiny model through the real CLI path (`mixtral-ft train recipes/tiny.yaml` with
overrides: logging every step, checkpoints with a save_total_limit, eval at each checkpoint, router telemetry,
wandb offline and tensorboard) in a child process of its own, so one length's memory does not carry into the next.
A callback put ahead of training's own samples, every --sample-every steps: the process's RSS, gc-tracked
objects, open file descriptors and threads, the median step time of the window (on_step_begin to on_step_end: the
step alone) and the window's wall time per step (evaluation, saves and logging included), the output folder's size
and the sizes of router_stats.jsonl, the newest checkpoint's trainer_state.json and mixtral_ft_state.json, the
tfevents and wandb files, and the trainer's log_history length. After training: run.json's size, the time from the
last step to the end (plots, final save) and the fits: the slope of each figure over the run's second half, per
1000 steps. The result file goes to benchmarks/results/<date>-long-run-<cpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "train.max_length=32",
    "train.per_device_train_batch_size=1",
    "train.logging_steps=1",
    "train.save_steps=250",
    "train.save_total_limit=2",
    "data.test_size=0.05",  # 3 eval rows, evaluated at every checkpoint (eval_steps null)
    "logging.router_stats_steps=10",
    "logging.report_to=[wandb,tensorboard]",
]


def proc_status(key: str, pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def descendants(pid: int | str = "self") -> list[str]:
    """Every process below this one (wandb's service process among them), from /proc/PID/task/*/children."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            found += [child, *descendants(child)]
    return found


def tree_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file()) if path.exists() else 0


def file_bytes(path: Path | None) -> int:
    return path.stat().st_size if path is not None and path.is_file() else 0


def newest_checkpoint(out: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def sample(out: Path, state, step_times: list[float], window_s: float, window_steps: int, malloc) -> dict:
    ckpt = newest_checkpoint(out)
    row = {
        "step": state.global_step,
        "rss_mib": round(proc_status("VmRSS") / 1024, 1),
        "children_rss_mib": round(sum(proc_status("VmRSS", pid) for pid in descendants()) / 1024, 1),
        "gc_objects": len(gc.get_objects()),
        "allocated_blocks": sys.getallocatedblocks(),  # every Python object, also those gc does not track
        "open_fds": len(os.listdir("/proc/self/fd")),
        "threads": proc_status("Threads"),
        "step_median_ms": round(1000 * statistics.median(step_times), 2) if step_times else None,
        "wall_per_step_ms": round(1000 * window_s / max(window_steps, 1), 2),
        "log_history": len(state.log_history),
        "out_dir_bytes": tree_bytes(out),
        "router_stats_bytes": file_bytes(out / "router_stats.jsonl"),
        "trainer_state_bytes": file_bytes(ckpt / "trainer_state.json" if ckpt else None),
        "carry_state_bytes": file_bytes(ckpt / "mixtral_ft_state.json" if ckpt else None),
        "checkpoint_bytes": tree_bytes(ckpt) if ckpt else 0,
        "checkpoints": len(list(out.glob("checkpoint-*"))),
        "tfevents_bytes": tree_bytes(out / "tensorboard", "*tfevents*"),
        "wandb_bytes": tree_bytes(out / "wandb"),
    }
    if malloc is not None:
        row["traced_mib"] = round(malloc.get_traced_memory()[0] / 2**20, 2)
    return row


def make_sampler(out: Path, every: int, samples: Path, use_tracemalloc: bool):
    """A TrainerCallback writing one JSON line per sample to `samples` (appended, so a killed run keeps them)."""
    import tracemalloc

    from transformers import TrainerCallback

    class Sampler(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self.window = (time.perf_counter(), 0)
            self.first_snapshot = None

        def on_train_begin(self, args, state, control, **kwargs):
            if use_tracemalloc:
                tracemalloc.start(8)
            self.window = (time.perf_counter(), state.global_step)

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = self.last_step_end = time.perf_counter()
            self.step_times.append(now - self.began)
            if state.global_step % every and state.global_step != state.max_steps:
                return
            started, step0 = self.window
            malloc = tracemalloc if use_tracemalloc else None
            row = sample(out, state, self.step_times, now - started, state.global_step - step0, malloc)
            with samples.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if use_tracemalloc:
                self.snapshot_growth(state.global_step, state.max_steps, samples)
            self.step_times = []
            self.window = (time.perf_counter(), state.global_step)

        def snapshot_growth(self, step: int, max_steps: int, samples: Path) -> None:
            # The baseline a quarter in (start-up allocations settled), the diff at the end: what kept growing.
            if self.first_snapshot is None and step >= max_steps // 4:
                self.first_snapshot = tracemalloc.take_snapshot()
            elif step == max_steps and self.first_snapshot is not None:
                stats = tracemalloc.take_snapshot().compare_to(self.first_snapshot, "traceback")
                top = [{"kib": round(s.size_diff / 1024, 1), "count": s.count_diff, "where": s.traceback.format()[-6:]}
                       for s in stats[:12]]  # fmt: skip
                samples.with_suffix(".tracemalloc.json").write_text(json.dumps(top, indent=1) + "\n")

    return Sampler()


def child(args) -> int:
    """One training run with the sampler, in this process."""
    import mixtral_ft.train.callbacks
    from mixtral_ft.cli import main

    out, samples = Path(args.out_dir), Path(args.samples)
    sampler = make_sampler(out, args.sample_every, samples, args.tracemalloc)
    make = mixtral_ft.train.callbacks.make_callbacks
    mixtral_ft.train.callbacks.make_callbacks = lambda recipe, o: [sampler, *make(recipe, o)]
    code = main(["train", str(ROOT / "recipes/tiny.yaml"), f"train.output_dir={out}",
                 f"train.max_steps={args.max_steps}", *OVERRIDES, *args.set])  # fmt: skip
    # What follows the last step: the plots, the final save, run.json, the model card.
    after = time.perf_counter() - sampler.last_step_end
    samples.with_suffix(".end.json").write_text(json.dumps({"after_last_step_s": round(after, 2)}) + "\n")
    return code


def slope_per_1000(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of `key` against step over the second half of the run, per 1000 steps."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    pts = pts[len(pts) // 2 :]
    if len(pts) < 3:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return round(1000 * sum((x - mx) * (y - my) for x, y in pts) / var, 3) if var else None


GROWTH_KEYS = ("rss_mib", "children_rss_mib", "gc_objects", "allocated_blocks",
               "open_fds", "threads", "step_median_ms", "wall_per_step_ms",
               "out_dir_bytes", "router_stats_bytes", "trainer_state_bytes", "carry_state_bytes",
               "checkpoint_bytes", "tfevents_bytes", "wandb_bytes", "log_history", "traced_mib")  # fmt: skip


def run_length(steps: int, args, work: Path) -> dict:
    out, samples = work / f"run-{steps}", work / f"samples-{steps}.jsonl"
    samples.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "--max-steps", str(steps), "--out-dir", str(out),
           "--samples", str(samples), "--sample-every", str(args.sample_every),
           *(["--tracemalloc"] if args.tracemalloc else []), *(x for s in args.set for x in ("--set", s))]  # fmt: skip
    # One torch thread: on 2 shared cores two threads that wait on each other made whole windows 20x slower.
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in samples.read_text().splitlines()] if samples.is_file() else []
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    trace, end = samples.with_suffix(".tracemalloc.json"), samples.with_suffix(".end.json")
    return {
        "max_steps": steps,
        "exit_code": proc.returncode,
        "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
        "wall_s": round(wall, 1),
        "train_runtime_s": run.get("train_runtime_s"),
        "eval_and_save_s": run.get("eval_and_save_s"),
        **(json.loads(end.read_text()) if end.is_file() else {}),
        "run_json_bytes": file_bytes(out / "run.json"),
        "run_json_losses": len(run.get("losses", [])),
        "loss_curve_png_bytes": file_bytes(out / "loss_curve.png"),
        "router_heatmap_png_bytes": file_bytes(out / "router_heatmap.png"),
        "out_dir_bytes": tree_bytes(out),
        "slopes_per_1000_steps": {k: slope_per_1000(rows, k) for k in GROWTH_KEYS},
        "samples": rows,
        **({"tracemalloc_top": json.loads(trace.read_text())} if trace.is_file() else {}),
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 3000])
    p.add_argument("--sample-every", type=int, default=50)
    p.add_argument("--work", default="/tmp/mixtral-ft-long-run")
    p.add_argument("--out", help="result file (default benchmarks/results/<date>-long-run-<cpu>.json)")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--set", action="append", default=[], help="an extra recipe override, key=value")
    p.add_argument("--tracemalloc", action="store_true", help="trace Python allocations (slower steps)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--samples", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_name()
    slug = "".join(c if c.isalnum() else "-" for c in cpu.lower()).strip("-")
    dest = Path(args.out or ROOT / "benchmarks/results" / f"{args.date}-long-run-{slug}.json")
    result = {"date": args.date, "cpu": cpu, "cores": os.cpu_count(), "overrides": OVERRIDES + args.set, "runs": []}
    for steps in args.steps:
        subprocess.run(["rm", "-rf", str(work / f"run-{steps}")], check=True)
        result["runs"].append(run_length(steps, args, work))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(result, indent=1) + "\n")  # after each length: a killed run keeps the rest
        r = result["runs"][-1]
        print(f"{steps} steps: exit {r['exit_code']}, {r['wall_s']} s; slopes/1000 steps {r['slopes_per_1000_steps']}")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
