"""I/O failures of a run (a full disk, a read-only or vanished mount, no permission, a file-size limit) as one line.

They are not bad input (exit 2) nor a diverged run (exit 1): the CLI prints which path failed and why, names the
last complete checkpoint, and exits `EXIT_IO` (74, sysexits' EX_IOERR). The libraries report them in several
shapes: an OSError (often wrapped), torch.save's "file write failed" RuntimeError, safetensors' "Os { code: 28 }".
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

EXIT_IO = 74
ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EIO}
_OS_CODE = re.compile(r"Os \{ code: (\d+)")  # safetensors (Rust) errors


def io_failure(exc: BaseException) -> tuple[str, str | None] | None:
    """(cause, path or None) when `exc`, or an exception it wraps, is a storage failure; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in ERRNOS:
            path = exc.filename2 or exc.filename  # a copy fails on its destination
            return os.strerror(exc.errno), str(path) if path else None
        text = str(exc)
        code = _OS_CODE.search(text)
        if code and int(code[1]) in ERRNOS:
            return os.strerror(int(code[1])), None
        if "PytorchStreamWriter failed" in text or "file write failed" in text:
            return "a write failed (full disk or file-size limit)", None
        exc = exc.__cause__ or exc.__context__
    return None


def io_message(exc: BaseException, output_dir: str | Path | None) -> str | None:
    """The one line for an I/O failure during `train` into `output_dir`, or None when `exc` is not one."""
    from mixtral_ft.train.resume import newest_complete

    found = io_failure(exc)
    if found is None:
        return None
    cause, path = found
    where = path or output_dir or "the output folder"
    kept = ""
    if output_dir is not None:
        try:
            last, _ = newest_complete(Path(output_dir))
        except OSError:
            last = None
        kept = f"; the last complete checkpoint is {last}" if last else "; no complete checkpoint was saved"
    return (
        f"cannot write '{where}': {cause}{kept}. Free space (or fix the mount or permissions) and run the "
        "same command again: it resumes, or finishes the outputs of a run that completed"
    )
