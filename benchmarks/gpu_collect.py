"""Files a GPU session's results (benchmarks/gpu_truth.py's three files) under benchmarks/results/.

    python benchmarks/gpu_collect.py /work/.device/<files_at>    # the folder the device tool copied $OUT into

Every file is renamed `<date>-<gpu>-<name>` (bench's result files already are), so results of several sessions
sit side by side and tests/plan/test_preflight.py checks `plan` against each bench run whose levers plan models. Then it
prints the figures benchmarks/NOTES.md needs: each bench run's tok/s and peak beside plan's prediction (where
plan models its levers), our speed-up over each peer, and whether the checks and the training stage passed. A bench
file that is not `complete` (a stage stopped at the budget, an OOM, Ctrl-C) is flagged PARTIAL, with why and the
batches it lacks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def prefix(members: dict[str, bytes]) -> str:
    gpu = json.loads(members.get("env.json") or b"{}").get("gpu", {})
    name = gpu.get("name") or ("cpu" if gpu else "unknown-device")  # a CPU dry run's env has no GPU name
    dated = [m for m in members if re.match(r"\d{4}-\d{2}-\d{2}-", Path(m).name)]
    date = Path(dated[0]).name[:10] if dated else "undated"
    return f"{date}-{name.lower().replace(' ', '-')}"


def collect(folder: Path, results: Path = RESULTS) -> list[Path]:
    with tarfile.open(folder / "gpu-truth.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for log in sorted(folder.glob("gpu-truth-*.log")):
        members[log.name] = log.read_bytes()
    members["gpu-truth.json"] = (folder / "gpu-truth.json").read_bytes()
    head = prefix(members)
    results.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sorted(members.items()):
        base = Path(name).name
        target = results / (base if base.startswith(head[:10]) else f"{head}-{name.replace('/', '-')}")
        target.write_bytes(data)
        written.append(target)
    return written


def bench_lines(report: dict, tag: str) -> list[str]:
    from mixtral_ft.bench.throughput import plan_covers
    from mixtral_ft.plan.preflight import compare_bench

    lines = [] if report.get("complete") else [f"{tag:28} PARTIAL: {stop_note(report)}"]
    for run in report.get("runs", []):
        plan = compare_bench(run) if plan_covers(run["levers"]) else None
        predicted = f", plan {plan['predicted_gib']:.1f} GiB ({plan['error']:+.1%})" if plan else ""
        compiled = f", compile {run['compile']}" if "compile" in run else ""
        lines.append(
            f"{tag:28} B{run['batch']}: {run['tok_per_s']:8,.0f} tok/s, peak {run['peak_gib']:.1f} GiB{predicted}, "
            f"HFU {run['hfu']:.1%}, loss {run.get('loss', float('nan')):.4f}{compiled}"
        )
    for name, entries in report.get("peers", {}).items():
        for batch, peer in zip(report["batch"], entries):
            figures = (
                f"{peer['tok_per_s']:,.0f} tok/s, ours {peer['our_speedup']:.2f}x" if "our_speedup" in peer else ""
            )
            lines.append(f"{'  peer ' + name:28} B{batch}: {figures or peer.get('error') or peer.get('skipped')}")
    return lines


def stop_note(report: dict) -> str:
    """Why a result file is not complete: its own `stopped`, else it was killed outright (or predates the key)."""
    if "complete" not in report:
        return "written by a bench that did not mark complete files; the batch list may be cut short"
    pending = ", ".join(f"B{b}" for b in report.get("pending", [])) or "none"
    return f"{report.get('stopped') or 'killed with no word (SIGKILL, the OOM killer)'}; not measured: {pending}"


def summary(written: list[Path]) -> list[str]:
    lines = []
    for path in written:
        if path.suffix != ".json":
            continue
        data = json.loads(path.read_text())
        if "runs" in data:
            lines += bench_lines(data, path.stem.split("-", 3)[-1])
        elif path.name.endswith("checks.json") or path.name.endswith("train.json"):
            verdict = data.get("ok", all(v.get("ok", True) for v in data.values() if isinstance(v, dict)))
            lines.append(f"{path.name}: {'ok' if verdict else 'FAILED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if not (args.folder / "gpu-truth.tar.gz").is_file():
        print(
            f"error: {args.folder} holds no gpu-truth.tar.gz: pass the folder the device tool returned", file=sys.stderr
        )
        return 2
    written = collect(args.folder)
    print("\n".join([*map(str, written), "", *summary(written)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
