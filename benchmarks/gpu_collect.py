"""Files a GPU session's results (benchmarks/gpu_truth.py's three files) under benchmarks/results/.

    python benchmarks/gpu_collect.py /work/.device/<files_at>    # the folder the device tool copied $OUT into

Every file is renamed `<date>-<gpu>-<name>` (bench's result files already are), so results of several sessions
sit side by side and tests/plan/test_preflight.py checks `plan` against each bench run at default levers.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if not (args.folder / "gpu-truth.tar.gz").is_file():
        print(
            f"error: {args.folder} holds no gpu-truth.tar.gz: pass the folder the device tool returned", file=sys.stderr
        )
        return 2
    for path in collect(args.folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
