"""A checkpoint's manifest: the SHA-256 of every file in it, written last, so it marks the save complete too.

The Trainer writes a checkpoint file by file; a kill, a full disk or a bad page flush can leave any of them short
or silently altered (same size, flipped bytes). `write_manifest` runs after everything else in the folder is
written (guards' and carry's `on_save` callbacks, in that order) and renames its file into place, so a folder
with a readable manifest was saved whole; `manifest_problem` re-hashes before a resume trusts it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MANIFEST = "checksums.sha256"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """`sha256  name` per file (sha256sum's format, so `sha256sum -c` checks it too), renamed into place."""
    lines = [
        f"{file_digest(p)}  {p.name}\n"
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    ]
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())  # the marker must not reach the disk before what it vouches for
    tmp.replace(folder / MANIFEST)
    return folder / MANIFEST


def manifest_problem(folder: Path) -> str | None:
    """Why `folder`'s files do not match its manifest, or None when every listed file is there and intact."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the save was cut short)"
    try:
        entries = [line.rstrip("\n").split("  ", 1) for line in manifest.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
        return f"{MANIFEST} is unreadable"
    for expected, name in entries:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            if file_digest(path) != expected:
                return f"{name} does not match its checksum (corrupted)"
        except OSError:
            return f"{name} is unreadable"
    return None
