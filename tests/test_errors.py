"""errors.io_failure: storage failures recognised in every shape the libraries report them."""

import errno

import pytest

from mixtral_ft.errors import io_failure


def wrapped(inner: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("saving failed") from inner
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "found"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out/x.bin"),
            ("No space left on device", "/data/out/x.bin"),
        ),
        (wrapped(OSError(errno.EROFS, "Read-only file system", "/ro")), ("Read-only file system", "/ro")),
        (Exception("Error while serializing: I/O error: File too large (os error 27)"), ("File too large", None)),
        (Exception("IoError(Os { code: 28, kind: StorageFull })"), ("No space left on device", None)),
        (
            RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file"),
            ("a write failed (full disk or file-size limit)", None),
        ),
        (ValueError("a bad value"), None),
        (OSError(errno.ENOENT, "No such file or directory", "/x"), None),  # a missing path is the user's input
    ],
)
def test_storage_failures_and_only_those(exc, found):
    assert io_failure(exc) == found
