"""One prepared GPU session (issue 18): correctness on CUDA, the real training path, ours against the peers, the levers.

    bash benchmarks/gpu_truth.sh [--budget 500] [--only NAME,...] [--redo]   # on the GPU box (installs the wheels)
    python benchmarks/gpu_truth.py --dry-run --work /tmp/truth-dry --out /tmp/truth-out   # the same plan on CPU

Stages run in the order below, each a subprocess. A stage starts only if its estimate fits in what is left of
--budget, and a running one is stopped when the budget ends; every stage writes its files as it goes, so a stop
keeps what was measured. State lives in --work (default /tmp/gpu-truth, outside $OUT): a second call on the same
warm machine skips the stages already done (--redo runs them again). After each stage everything small in --work
is packed into <out>/gpu-truth.tar.gz beside <out>/gpu-truth.json (the stage table); the live log is
<out>/gpu-truth-<call>.log. Three files: well inside what the device tool brings back.
`python benchmarks/gpu_collect.py FOLDER` then files them under benchmarks/results/, dated and named for the GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PACKED_SUFFIXES = {".json", ".txt", ".log", ".xml", ".jsonl", ".yaml", ".md"}
PACKED_MAX_BYTES = 4 << 20
DRY_SIZE = ["--device", "cpu", "--tiny", "--seq", "64", "--steps", "1", "--warmup", "0"]
# Files that hold GPU-marked tests, imported on the GPU image (no gradio, playwright or notebooks there).
GPU_TESTS = ["tests/model/test_quant.py", "tests/model/test_grouped_gemm.py", "tests/bench/test_throughput.py"]
GPU_TESTS += ["tests/train/test_memory.py", "tests/test_distributed.py", "tests/export/test_verify.py"]


@dataclass
class Stage:
    name: str
    estimate_s: int  # on an H100/H200; the budget check uses it
    commands: list[list[str]]


def size(args) -> list[str]:
    """The model every bench and compare run measures: full depth, or tiny shapes on --dry-run."""
    return DRY_SIZE if args.dry_run else ["--layers", "32"]


def bench(args, tag: str, *flags: str, batch: tuple[str, ...] = ("2", "8")) -> list[str]:
    """One `mixtral-ft bench` run: ours only, 32 layers (tiny on --dry-run), one result file tagged `tag`."""
    return [
        PY,
        "-m",
        "mixtral_ft.bench",
        *size(args),
        "--batch",
        *batch,
        *flags,
        "--tag",
        tag,
        "--out-dir",
        f"{args.work}/bench",
    ]


def script(name: str, *arguments: str) -> list[str]:
    return [PY, str(ROOT / "benchmarks" / name), *arguments]


def gpu_tests(args, select: str, xml: str) -> list[str]:
    """The GPU-marked tests of GPU_TESTS that `select` (a pytest -k expression) picks, with a junit report."""
    junit = ["--junitxml", f"{args.work}/{xml}"]
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-k", select, *junit, *GPU_TESTS]


def stages(args) -> list[Stage]:
    """The plan, in issue 18's order of value: later stages are what a short budget drops."""
    work, small = args.work, ["--device", "cpu", "--small"] if args.dry_run else []
    compare = script("compare.py", *size(args), "--batch", "2", "8")
    compare += ["--profile", "--tag", "compare", "--out-dir", f"{work}/bench"]
    compare += ["--peer-v4-site", str(args.peer_v4_site)] if args.peer_v4_site else []
    train = script("train_check.py", *small, "--work", f"{work}/train", "--out", f"{work}/train.json")
    levers = ["train.compile=true", "train.reuse_dequantized=true", *([] if args.dry_run else ["train.liger=true"])]
    train_levers = script("train_check.py", *small, "--work", f"{work}/train-levers", "--model", f"{work}/train/model")
    train_levers += ["--out", f"{work}/train-levers.json", "--once", *(f"--set={lever}" for lever in levers)]
    return [
        Stage("env", 20, [script("gpu_env.py", "--out", f"{work}/env.json")]),
        Stage(
            "checks",
            90,
            [
                script("cuda_checks.py", *small, "--out", f"{work}/checks.json"),
                gpu_tests(args, "not full_depth and not each_lever", "gpu-tests.xml"),
            ],
        ),
        Stage("train", 150, [train]),
        Stage("compare", 240, [compare]),
        Stage("lever-compile", 120, [bench(args, "lever-compile", "--compile")]),
        Stage("lever-reuse", 60, [bench(args, "lever-reuse", "--reuse-dequantized")]),
        Stage("lever-reuse-compile", 120, [bench(args, "lever-reuse-compile", "--reuse-dequantized", "--compile")]),
        Stage("lever-tests", 100, [gpu_tests(args, "each_lever", "gpu-lever-tests.xml")]),
        Stage("train-levers", 120, [train_levers]),
        Stage("no-checkpointing", 40, [bench(args, "lever-no-checkpointing", "--no-checkpointing", batch=("2",))]),
        Stage("skip-checkpoint-2", 40, [bench(args, "lever-skip2", "--skip-checkpoint-layers", "2", batch=("2",))]),
        Stage("liger", 60, [] if args.dry_run else [bench(args, "lever-liger", "--liger")]),
        Stage("experts-loop", 40, [bench(args, "lever-loop", "--experts", "loop", batch=("2",))]),
        Stage("lora-dropout", 40, [bench(args, "lever-dropout", "--lora-dropout", "0.05", batch=("2",))]),
    ]


def pack(work: Path, out: Path) -> None:
    """Everything small in `work` (results, logs, profiles; no checkpoints) into out/gpu-truth.tar.gz, atomically."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.rglob("*")):
            small = path.is_file() and path.stat().st_size <= PACKED_MAX_BYTES
            if (
                small
                and path.suffix in PACKED_SUFFIXES
                and "checkpoint-" not in str(path)
                and "/model/" not in str(path)
            ):
                tar.add(path, arcname=str(path.relative_to(work)))
    partial = out / "gpu-truth.tar.gz.partial"
    partial.write_bytes(buffer.getvalue())
    partial.replace(out / "gpu-truth.tar.gz")


def group_alive(pgid: int) -> bool:
    """Whether a process of this group still runs (a killed orphan waits as a zombie until init reaps it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state != "Z" and int(group) == pgid:
            return True
    return False


def stop_group(proc: subprocess.Popen) -> None:
    """Kill the command and its children (the v4 peer, compile workers), and wait until they are gone: the next
    stage must not share the GPU with a dying one."""
    os.killpg(proc.pid, 9)
    proc.wait()
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_stage(stage: Stage, seconds_left: float, log) -> dict:
    """The stage's commands in turn; the first that fails or runs out of time ends it."""
    started = time.perf_counter()
    result = {"status": "ok", "commands": []}
    for command in stage.commands:
        left = seconds_left - (time.perf_counter() - started)
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            code = "budget"
        result["commands"].append({"command": command[1:3], "exit_code": code})
        if code != 0:
            result["status"] = "stopped at the budget" if code == "budget" else f"failed (exit {code})"
            break
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=500, help="seconds for this call's stages (default 500)")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/gpu-truth"), help="state and results (default /tmp/gpu-truth)"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-truth-out")))
    parser.add_argument("--only", help="comma-separated stage names to run (others are skipped)")
    parser.add_argument("--redo", action="store_true", help="run stages again that an earlier call finished")
    parser.add_argument("--peer-v4-site", type=Path, help="transformers 4.57 side folder for the v4 peer")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on CPU with tiny shapes")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    return parser.parse_args(argv)


def save(table: dict, args) -> None:
    """The stage table and the packed results, in --work and in the output folder: what a stop leaves behind."""
    text = json.dumps(table, indent=2) + "\n"
    (args.work / "gpu-truth.json").write_text(text)
    (args.out / "gpu-truth.json").write_text(text)
    pack(args.work, args.out)


def run_plan(plan: list[Stage], only: set[str], args, table: dict, log) -> None:
    call, started = len(table["calls"]), time.perf_counter()
    for stage in plan:
        left = args.budget - (time.perf_counter() - started)
        done = table["stages"].get(stage.name, {}).get("status") == "ok"
        if stage.name not in only or not stage.commands or (done and not args.redo):
            continue
        if stage.estimate_s > left:
            table["stages"].setdefault(stage.name, {})["skipped"] = f"call {call}: {left:.0f} s left"
            continue
        print(
            f"[{args.budget - left:4.0f} s] {stage.name}: started (~{stage.estimate_s} s; {left:.0f} s left)",
            flush=True,
        )
        result = table["stages"][stage.name] = run_stage(stage, left, log) | {"call": call}
        print(f"[{time.perf_counter() - started:4.0f} s] {stage.name}: {result['status']}", flush=True)
        save(table, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = stages(args)
    if args.list:
        for stage in plan:
            commands = " && ".join(" ".join(["python", *c[1:]]).replace(f"{ROOT}/", "") for c in stage.commands)
            print(f"{stage.name:20} ~{stage.estimate_s:3d} s  {commands or '(not on --dry-run)'}")
        return 0
    names = {s.name for s in plan}
    only = set(args.only.split(",")) if args.only else names
    if only - names:
        print(f"error: unknown stage(s) {', '.join(sorted(only - names))}: use --list to see them", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table_path = args.work / "gpu-truth.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {"calls": [], "stages": {}}
    now = dt.datetime.now().isoformat(timespec="seconds")
    table["calls"].append({"call": len(table["calls"]) + 1, "started": now, "budget_s": args.budget})
    with open(args.out / f"gpu-truth-{len(table['calls'])}.log", "a", buffering=1) as log:
        run_plan(plan, only, args, table, log)
    save(table, args)
    print(f"done: {args.out}/gpu-truth.tar.gz", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
