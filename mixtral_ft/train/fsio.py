"""I/O failures of a run (a full disk, a read-only or vanished mount, no permission, a file-size limit) as one line.

They are not bad input (exit 2) nor a diverged run (exit 1): `train` prints which path failed and why, names the
last complete checkpoint, and exits `EXIT_IO` (74, sysexits' EX_IOERR). `errors.io_failure` recognises them.
"""

from __future__ import annotations

from pathlib import Path

from mixtral_ft.errors import io_failure


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
