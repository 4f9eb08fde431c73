"""Model folders appear whole or not at all: written into a hidden sibling, renamed into place at the end.

A `quantize` or `merge` stopped halfway (an error, Ctrl-C, a full disk) would otherwise leave a folder that
looks like a model and fails to load, or loads wrong. The staging folder is a sibling so the final rename
stays on one filesystem, where it is atomic. A destination that already holds files is never touched. SIGTERM
unwinds too (the staging folder goes); what a kill -9 leaves, the next run for the same OUT removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixtral_ft.common import sigterm_unwinds
from mixtral_ft.errors import UserError


def refuse_nonempty(path: Path, what: str) -> None:
    """UserError unless `path` is missing or an empty folder in a folder we can write; `what` names it as the
    user typed it (OUT, --out). Called before the work, which takes minutes on Mixtral."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{what} '{path}' already exists and is not empty: choose a new folder")
    refuse_unwritable(path, what)


def refuse_unwritable(path: Path, what: str) -> None:
    """UserError unless `path` (a folder or a file to be made) can be created: its nearest existing ancestor is a
    folder a file can be written in. A real probe, as os.access passes root on a read-only mount or /proc."""
    above = next(p for p in Path(os.path.abspath(path)).parents if p.exists())  # where `path` will be made
    try:
        if not above.is_dir():
            raise NotADirectoryError
        tempfile.TemporaryFile(dir=above).close()
    except OSError:
        raise UserError(
            f"cannot write {what} '{path}' ('{above}' is not a writable folder): choose a folder you can write to"
        ) from None


STAGING = "-staging-"  # .NAME-staging-PID-xxxx: the PID tells a later run whether its owner is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove_stale(out: Path) -> None:
    """Delete staging folders for `out` whose process is gone (killed with -9, or a machine that went down)."""
    prefix = f".{out.name}{STAGING}"
    for folder in out.parent.glob(f"{prefix}*"):
        pid = folder.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_folder(out: str | Path, what: str) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it becomes `out`, on an exception or SIGTERM it is deleted."""
    out = Path(out)
    refuse_nonempty(out, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}{os.getpid()}-", dir=out.parent))
    except OSError as exc:  # a read-only mount, no permission, a file where a folder should be
        reason = exc.strerror or exc
        raise UserError(f"cannot write {what} '{out}' ({reason}): choose a folder you can write to") from None
    try:
        with sigterm_unwinds():
            yield staging
            staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the model private to its writer
            if out.exists():
                out.rmdir()  # empty, checked above; rmdir refuses if something was written there since
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the rename there is nothing left to remove
