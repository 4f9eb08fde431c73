"""How a failure reaches the user: bad input (exit 2) and storage failures (exit 74), each as one line.

`UserError` is a problem in the recipe, data, paths or flags: the CLI prints it and exits 2. A full disk, a
read-only or vanished mount, no permission or a file-size limit is not bad input: `io_failure` recognises it in
the shapes the libraries report it (an OSError, often wrapped; torch.save's "file write failed" RuntimeError;
safetensors' "(os error 28)"), and the CLI exits `EXIT_IO` (74, sysexits' EX_IOERR).
"""

import argparse
import errno
import os
import re

EXIT_IO = 74
ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EIO}
# Rust's io::Error in safetensors' messages: "Os { code: 28, ... }" (older) or "... (os error 28)" (0.8).
_OS_CODE = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")


class UserError(Exception):
    """A problem the user can fix (recipe, data, paths, flags). The message names the problem and the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: it would print its usage too, and a bad flag is one line like all input."""

    def error(self, message):
        raise UserError(f"{message}: see `{self.prog} --help`")


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
        if code and int(code[1] or code[2]) in ERRNOS:
            return os.strerror(int(code[1] or code[2])), None
        if "PytorchStreamWriter failed" in text or "file write failed" in text:
            return "a write failed (full disk or file-size limit)", None
        exc = exc.__cause__ or exc.__context__
    return None
