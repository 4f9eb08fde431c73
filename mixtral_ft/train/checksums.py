"""A checkpoint's manifest: the SHA-256 of every file in it, written last, so it marks the save complete too.

The Trainer writes a checkpoint file by file; a kill, a full disk or a bad page flush can leave any of them short
or silently altered (same size, flipped bytes). `write_manifest` runs after everything else in the folder is
written (guards' and carry's `on_save` callbacks, in that order) and renames its file into place, so a folder
with a readable manifest was saved whole; `manifest_problem` re-hashes before a resume trusts it. The file-level
checks (`safetensors_problem`, `torch_file_problem`) name what is wrong in a folder saved before manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
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


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read whole (a damaged header, a truncated body), or None."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size - 8:  # a damaged length field: never allocate what it claims
                return f"{path.name} has a corrupt header"
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + length + end:
            return f"{path.name} is truncated"
    except (OSError, ValueError, KeyError, TypeError, MemoryError, struct.error):
        return f"{path.name} is unreadable"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why a torch.save file (a zip archive) is missing, empty, truncated or corrupted, or None."""
    if not path.is_file() or path.stat().st_size == 0:
        return f"no {path.name}" if not path.is_file() else f"{path.name} is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:  # CRC of every member: what a partial page-cache flush leaves
                return f"{path.name} is corrupted"
    except (OSError, zipfile.BadZipFile):
        return f"{path.name} is truncated or not a torch.save file"
    return None
