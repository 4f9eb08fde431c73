"""A run's output folder: one run at a time, a replaced run kept until the new one can start, no empty leftovers.

- `claimed(output_dir)`: creates `train.output_dir`, takes an exclusive OS lock on `.lock` inside it (fcntl.flock: it
  dies with the process, so a killed run never leaves a stale lock) and holds it for the whole run. A second run
  into the same folder is a UserError naming the holder's PID. Multi-process runs take it on rank 0. When the run
  fails, a folder it created and left empty is removed again.
- `train.overwrite`: resume.check_existing_run only decides what a new run replaces; `defer_replace` records it and
  `replace_deferred` renames it aside and deletes it once every check that can fail with exit 2 has passed
  (recipe, data, model source, audit), so a run refused for bad input loses nothing of the previous one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixtral_ft.common import is_main_process
from mixtral_ft.errors import UserError

LOCK = ".lock"
ASIDE = ".replaced-"
_held: dict[str, int] = {}  # resolved output_dir -> the locked file descriptor
_deferred: dict[str, list[Path]] = {}  # resolved output_dir -> what train.overwrite replaces
_deferred_note: dict[str, str] = {}  # resolved output_dir -> the line replace_deferred prints, if not overwrite's


def _key(out: Path) -> str:
    return str(Path(out).resolve())


def lock(out: Path) -> None:
    """Hold the exclusive lock on `out` for this process (again: a no-op); UserError when another run holds it."""
    out = Path(out)
    if _key(out) in _held:
        return
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(
                f"train.output_dir '{out}' is not writable ({exc.strerror}): choose another folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"train.output_dir '{out}' is in use by another run (PID {holder}): wait for it to end, "
                "or choose another folder"
            ) from None
        try:  # the holder may have removed the file between our open and our lock: then lock the new file
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[_key(out)] = fd


def unlock(out: Path) -> None:
    fd = _held.pop(_key(out), None)
    if fd is None:
        return
    try:
        (Path(out) / LOCK).unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
    finally:
        os.close(fd)


def _missing(out: Path) -> list[Path]:
    """`out` and its parents that do not exist yet, deepest first."""
    missing, path = [], out.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def prepare(out: Path) -> None:
    """`out` as a folder this process can write in (created if missing); a UserError naming the fix otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir '{out}' is a file: choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"  # one per process: ranks probe the same folder at once
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"train.output_dir '{out}' is not writable ({exc.strerror}): choose another folder") from None


@contextmanager
def claimed(output_dir: str | Path) -> Iterator[Path]:
    """Create and lock the output folder for the run inside the block; undo the creation if the run fails empty."""
    out = Path(output_dir)
    created = _missing(out)
    try:
        prepare(out)  # inside: a folder created here and found unwritable is removed again
        if is_main_process():
            lock(out)
            for stale in out.glob(f"{ASIDE}*"):  # a replacement cut short by a kill
                shutil.rmtree(stale, ignore_errors=True)
        yield out
    except BaseException:
        unlock(out)
        _deferred.pop(_key(out), None)
        _deferred_note.pop(_key(out), None)
        for folder in created if is_main_process() else ():
            try:
                folder.rmdir()  # only if empty: what the run wrote stays
            except OSError:
                break
        raise
    unlock(out)


def defer_replace(out: Path, paths: list[Path], note: str | None = None) -> None:
    """Record what the new run replaces; `replace_deferred` removes it later. Every rank records, rank 0 removes.

    `note`: the line printed once they are removed (default: train.overwrite's count of the checkpoints removed).
    """
    if paths:
        _deferred[_key(out)] = list(paths)
        if note:
            _deferred_note[_key(out)] = note


def deferred(out: Path) -> list[Path]:
    return list(_deferred.get(_key(out), []))


def replace_deferred(out: Path) -> None:
    """Rename the replaced run aside (run.json last, so a cut-short move still reads as a finished run), delete it."""
    paths, note = _deferred.pop(_key(out), []), _deferred_note.pop(_key(out), None)
    if not paths or not is_main_process():
        return
    aside = Path(out) / f"{ASIDE}{os.getpid()}"
    try:
        aside.mkdir(exist_ok=True)
        for path in sorted(paths, key=lambda p: p.name == "run.json"):
            if path.exists():
                path.rename(aside / path.name)
        shutil.rmtree(aside)
    except OSError as exc:
        raise UserError(
            f"train.overwrite: cannot clear the previous run in '{out}' ({exc.strerror}): "
            "choose another train.output_dir"
        ) from None
    checkpoints = sum(p.name.startswith("checkpoint-") for p in paths)
    if note:
        print(note, flush=True)
    elif checkpoints:
        print(f"train.overwrite: removed {checkpoints} checkpoint(s) of the previous run in {out}", flush=True)
