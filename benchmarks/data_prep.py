"""How fast data preparation is, and how much host memory it takes: `load_sft_data` and `load_preference_data`.

    python benchmarks/data_prep.py --rows 4000 --out-dir benchmarks/results   # ~5 minutes on 2 cores

Writes N synthetic rows in realistic shape to a temp folder: multi-turn `messages` conversations of about
UltraChat's length (2-4 exchanges, ~1,400 tokens) and UltraFeedback-like preference pairs (a prompt, two answers
of a few hundred tokens), 1% of them broken so the drop counting runs too. Each measurement runs in a fresh
process (peak RSS is that process's, its worker processes' peak included), with a fresh HF_DATASETS_CACHE for
the cold run; the warm run is a second fresh process on the same cache (a restart, a resume, another rank).
num_proc goes through `data.num_proc` where the recipe has that key; before it existed, only 1 is measured.
The result file is `<date>-<cpu>-data_prep.json` in --out-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "model",
    "data",
    "training",
    "answer",
    "question",
    "because",
    "which",
    "people",
    "would",
    "their",
    "about",
    "could",
    "other",
    "there",
    "time",
    "system",
    "value",
    "function",
    "memory",
    "process",
    "result",
    "example",
    "language",
    "number",
    "problem",
    "between",
    "important",
    "however",
    "different",
    "information",
    "research",
    "analysis",
    "structure",
    "development",
    "approach",
    "quality",
    "support",
    "design",
    "network",
]


def words(rng: random.Random, n: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    return ". ".join(part.capitalize() for part in text.split(" the ")) + "."


def sft_row(rng: random.Random) -> dict:
    turns = []
    for _ in range(rng.randint(2, 4)):
        turns.append({"role": "user", "content": words(rng, rng.randint(30, 120))})
        turns.append({"role": "assistant", "content": words(rng, rng.randint(200, 500))})
    if rng.random() < 0.01:
        turns[-1]["content"] = ""  # a broken row: dropped ("empty assistant turn")
    return {"messages": turns}


def pair_row(rng: random.Random) -> dict:
    chosen, rejected = words(rng, rng.randint(100, 350)), words(rng, rng.randint(100, 350))
    if rng.random() < 0.01:
        rejected = chosen  # a broken pair: dropped ("chosen identical to rejected")
    return {"prompt": words(rng, rng.randint(20, 150)), "chosen": chosen, "rejected": rejected}


def write_rows(folder: Path, rows: int) -> dict[str, Path]:
    rng = random.Random(0)
    files = {"sft": folder / "sft.jsonl", "dpo": folder / "dpo.jsonl"}
    for kind, make in (("sft", sft_row), ("dpo", pair_row)):
        with open(files[kind], "w") as handle:
            for _ in range(rows):
                handle.write(json.dumps(make(rng)) + "\n")
    return files


def measure(kind: str, file: str, num_proc: int) -> dict:
    """One load in this process (run by the parent with a chosen HF_DATASETS_CACHE)."""
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.recipe import DataSection

    tokenizer = load_tokenizer(None, mode="finetuning")
    cfg = DataSection(path=file, max_bad_fraction=0.5)
    supported = "num_proc" in {f.name for f in dataclasses.fields(DataSection)}
    if supported:
        cfg = dataclasses.replace(cfg, num_proc=num_proc)
    elif num_proc != 1:
        return {"skipped": "no data.num_proc key in this version"}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    start = time.perf_counter()
    if kind == "sft":
        from mixtral_ft.data.conversations import load_sft_data

        data = load_sft_data(cfg, tokenizer, max_length=2048, seed=0)
        columns = ["input_ids"]
    else:
        from mixtral_ft.data.prefs import load_preference_data

        data = load_preference_data(cfg, tokenizer, max_length=2048, max_prompt_length=512, seed=0)
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    seconds = time.perf_counter() - start
    report = data.reports[0]
    table = data.train.data  # Arrow: counting tokens must not itself build Python lists
    tokens = sum(int(table.column(c).combine_chunks().value_lengths().to_numpy().sum()) for c in columns)
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
    return {
        "seconds": round(seconds, 2),
        "rows_read": report.read,
        "rows_kept": report.kept,
        "tokens": tokens,
        "rows_per_s": round(report.read / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
        "rss_before_mib": round(rss_before),
        "peak_rss_mib": round(peak_self),
        "peak_worker_rss_mib": round(peak_children),
        "dropped": report.dropped,
    }


def run_child(kind: str, file: Path, num_proc: int, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
    # -S passes on: measuring another checkout (PYTHONPATH=OLD:SITE_PACKAGES python -S ...) skips the editable install.
    command = [
        sys.executable,
        *(["-S"] if sys.flags.no_site else []),
        __file__,
        "--child",
        kind,
        str(file),
        str(num_proc),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown-cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out-dir", default="bench-results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="data_prep_") as tmp:
        files = write_rows(Path(tmp), args.rows)
        for kind, file in files.items():
            for num_proc in args.num_proc:
                cache = Path(tmp) / f"cache-{kind}-{num_proc}"
                for phase in ("cold", "warm"):
                    result = {
                        "kind": kind,
                        "num_proc": num_proc,
                        "phase": phase,
                        **run_child(kind, file, num_proc, cache),
                    }
                    print(json.dumps(result), flush=True)
                    results.append(result)
    cpu = cpu_name()
    summary = {
        "date": args.date,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "rows": args.rows,
        "max_length": 2048,
        "python": platform.python_version(),
        "results": results,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = "-".join(cpu.split()[:3]).replace("/", "_")
    path = out / f"{args.date}-{slug}-data_prep{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        raise SystemExit(0)
    raise SystemExit(main())
