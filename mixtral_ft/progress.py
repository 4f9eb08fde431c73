"""Progress for the commands that take minutes (eval, merge, quantize): a stderr line per phase, a bar per loop.

Lines go to stderr so stdout keeps only the result (reports, JSON). Each says the command and the time
since it started, e.g. `merge: [12s] shard 3/19 (model-00003-of-00019.safetensors)`.
"""

from __future__ import annotations

import sys
import time

_started: dict[str, float] = {}


def say(command: str, message: str) -> None:
    """One progress line for `command`, stamped with the seconds since its first line."""
    start = _started.setdefault(command, time.monotonic())
    print(f"{command}: [{time.monotonic() - start:.0f}s] {message}", file=sys.stderr, flush=True)


def bar(iterable, desc: str, total: int | None = None):
    """A tqdm bar on stderr (shown on terminals, silent in logs that are not one)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, mininterval=1.0, disable=None)
