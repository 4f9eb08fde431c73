"""A bench run's result file: its keys, its name, and how it is written so a stopped run never reads as a whole one.

The file exists from the start of the run (`complete: false`, every batch `pending`), is rewritten the moment
each batch is measured, and says `complete: true` only after the last one. A run killed outright (SIGKILL at
gpu_truth.py's budget, the kernel's OOM killer) so leaves `complete: false` and the batches still pending; one
stopped by Ctrl-C, SIGTERM, a CUDA OOM or a crash also says why and where in `stopped`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mixtral_ft.bench import steps
from mixtral_ft.bench.args import OUT_DIR
from mixtral_ft.common import sigterm_unwinds
from mixtral_ft.errors import UserError


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def new_report(args, device: torch.device) -> dict:
    """The result file's skeleton: `batch` is the list asked for, the per-batch lists follow it as far as measured,
    `pending` holds the batches not measured yet and `runs` every detail of ours."""
    return {
        "date": dt.date.today().isoformat(),
        "device": steps.device_name(device),
        "versions": versions(),
        "complete": False,
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "pending": list(args.batch),
        "levers": args.levers,
        "tok_per_s": [],
        "step_s": [],
        "peak_gib": [],
        "hfu": [],
        "runs": [],
    }


def result_path(result: dict, out_dir: Path = OUT_DIR, tag: str | None = None) -> Path:
    device = result["device"].lower().replace(" ", "-")
    return out_dir / f"{result['date']}-{device}{'-' + tag if tag else ''}.json"


def open_result(args, report: dict) -> Path:
    """Create --out-dir and the result file in it, under a new name (an earlier result is never overwritten).

    Created now, before the model is built: an unwritable folder is a one-line error before anything is measured,
    and two runs started together cannot pick the same name.
    """
    first = path = result_path(report, args.out_dir, args.tag)
    n = 2
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                with open(path, "x") as out:  # exclusive: a file of the same day, device and tag keeps its content
                    out.write(_text(report))
                return path
            except FileExistsError:
                path, n = first.with_name(f"{first.stem}-{n}.json"), n + 1
    except OSError as exc:
        reason = exc.strerror or exc
        raise UserError(
            f"--out-dir {args.out_dir}: cannot write the result file ({reason}): pass a writable folder"
        ) from exc


def record(report: dict, ours: dict) -> None:
    for key in ("tok_per_s", "step_s", "peak_gib", "hfu"):
        report[key].append(ours[key])
    report["runs"].append(ours)
    report["pending"].remove(ours["batch"])


def write_report(report: dict, path: Path) -> None:
    # Written aside and renamed, so a stop during the write cannot truncate the batches already in the file.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(_text(report))
    os.replace(partial, path)


def _text(report: dict) -> str:
    return json.dumps(report, indent=2) + "\n"


@dataclass
class Progress:
    """The batch the measuring loop is on, set by the loop, for the stop message. compare.py runs the peers after
    ours is recorded (no longer pending), so the first pending batch would name the next one."""

    batch: int | None = None


@contextmanager
def recording(report: dict, path: Path) -> Iterator[Progress]:
    """The measuring loop runs inside: any stop (Ctrl-C, SIGTERM, an error) writes why into the file, which keeps
    every batch recorded so far, and is re-raised; a loop that ends marks the file complete."""
    progress = Progress()
    try:
        with sigterm_unwinds():  # so the file says it stopped
            yield progress
    except BaseException as exc:
        at = progress.batch if progress.batch is not None else next(iter(report["pending"]), None)
        report["stopped"] = stop_reason(exc, at)
        write_report(report, path)
        kept = ", ".join(f"B{run['batch']}" for run in report["runs"]) or "no batch"
        print(f"stopped: {report['stopped']}; {path} keeps {kept} (complete: false)", file=sys.stderr, flush=True)
        raise
    report["complete"] = True
    write_report(report, path)


def stop_reason(exc: BaseException, batch: int | None) -> str:
    at = f" at batch {batch}" if batch is not None else ""
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted (Ctrl-C){at}"
    if isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM:
        return f"SIGTERM{at}"
    message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}{at}{': ' + message if message else ''}"
