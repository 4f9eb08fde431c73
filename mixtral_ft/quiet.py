"""Third-party chatter off the user's stderr, at the CLI's entry: what reaches it is ours, or an error.

Libraries log and warn about their own internals (bitsandbytes 0.50 logs, at import, that it found no
`kernels` package for a CPU kernel we never use; transformers, TRL, datasets and torch warn about
deprecations and defaults). None of it is the user's to act on, and it made a bad command's one-line error
several lines. We raise those libraries' loggers to ERROR and ignore their warnings by category and
module, so their errors, and our own output and progress bars, still show. `MIXTRAL_FT_VERBOSE=1` keeps
everything, for debugging.
"""

from __future__ import annotations

import logging
import os
import warnings

# Their loggers at ERROR; transformers and datasets reset theirs at import, from the variables below.
LOGGERS = ("bitsandbytes", "trl", "torch", "accelerate", "peft", "datasets", "transformers")
# Libraries that configure their own root logger on import read these instead (a user's setting wins). torch sets
# its logger back to WARNING on import unless TORCH_LOGS says otherwise ("-all": ERROR; TORCH_LOGS=recompiles etc.
# still work when set).
# WANDB_QUIET drops wandb's 25-line history and summary panel at the end of a run (the metrics are in run.json and
# in wandb); the upload command of an offline run it also drops is in our closing line (train/outputs.py).
VERBOSITY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TORCH_LOGS": "-all",
    "WANDB_QUIET": "true",
}
WARNING_MODULES = r"(bitsandbytes|transformers|trl|datasets|torch|accelerate|peft)(\.|$)"
WARNING_CATEGORIES = (UserWarning, RuntimeWarning)  # Future/DeprecationWarning: ignored everywhere, below


def quiet_third_party() -> None:
    """Call before the libraries are imported (some log at import)."""
    if os.environ.get("MIXTRAL_FT_VERBOSE", "") not in ("", "0"):
        return
    for name, value in VERBOSITY_ENV.items():
        os.environ.setdefault(name, value)
    if torch_older_than(2, 7):
        # torch 2.6 (our floor) with triton starts inductor's compile workers as soon as anything imports its
        # async_compile: processes nobody asked for, whose shutdown warnings reached the user's stderr. Left off,
        # the pool starts when a compile first needs it. Newer torch warms it at the first compile: kept.
        os.environ.setdefault("TORCH_WARM_POOL", "0")
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in WARNING_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=WARNING_MODULES)
    # Deprecations raised on a library's behalf (stacklevel points at its caller, e.g. peft calling
    # transformers) are not the user's to fix either.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Python hides these unless PYTHONWARNINGS asks; then torch 2.6's module-level TemporaryDirectory
    # (torch.distributed.nn.jit.instantiator) turned a one-line error into seven at exit.
    warnings.filterwarnings("ignore", category=ResourceWarning)


def torch_older_than(major: int, minor: int) -> bool:
    """The installed torch is older than major.minor (read from its metadata: torch is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = tuple(int(part) for part in version("torch").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return found < (major, minor)
