"""Model folders appear whole or not at all: written into a hidden sibling, renamed into place at the end.

A `quantize` or `merge` stopped halfway (an error, Ctrl-C, a full disk) would otherwise leave a folder that
looks like a model and fails to load, or loads wrong. The staging folder is a sibling so the final rename
stays on one filesystem, where it is atomic. A destination that already holds files is never touched.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixtral_ft.errors import UserError


def refuse_nonempty(path: Path, what: str) -> None:
    """UserError unless `path` is missing or an empty folder; `what` names it as the user typed it (OUT, --out)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{what} '{path}' already exists and is not empty: choose a new folder")


@contextmanager
def staged_folder(out: str | Path, what: str) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it becomes `out`, on an exception it is deleted."""
    out = Path(out)
    refuse_nonempty(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty, checked above; rmdir refuses if something was written there since
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the rename there is nothing left to remove
