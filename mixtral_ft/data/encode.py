"""Tokenizing a source's rows at scale: `datasets.Dataset.map` in batches, in parallel, cached on disk.

conversations.py and prefs.py each hand over one function that turns one row into its token columns (or raises
ValueError(reason) to drop it). `encode_rows` runs it through `Dataset.map(batched=True)`: rows go to Arrow a
batch at a time, so host memory stays bounded whatever the dataset's size, and `num_proc` processes share
the work. The result is cached beside the source's own Arrow cache (HF_DATASETS_CACHE) under a fingerprint
of everything the ids depend on: the source rows, the settings (format, lengths, ...), the tokenizer file,
mistral-common's version and the source of the modules that encode (a code fix never reuses a stale cache).
A restart, a resume or another rank on the machine then reads the Arrow file instead of tokenizing again.
Sources held in memory (no cache files) are simply computed.

Each row also gets helper columns (`_drop`: why it was dropped, null if kept; `_`-prefixed counts); they are
summed for the SourceReport, then the dropped rows and the helper columns go.

With several processes, Ctrl-C (sent to the whole process group) is the parent's alone to answer: the workers
ignore it and die at the pool's SIGTERM (sigterm_unwinds lets a forked child die as by default), and the parent's
KeyboardInterrupt (or SIGTERM's SystemExit) is raised as itself, not as the TimeoutError datasets' pool raises
over it while it collects its workers' results. The CLI then prints its one line instead of a traceback from
every process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from mixtral_ft.common import local_world_size, sigterm_unwinds
from mixtral_ft.data.files import no_progress_bars

DROP = "_drop"  # helper column: why the row was dropped; null for a kept row
# The modules whose code decides the ids and masks: any change to them gives a new cache key.
CODE = ("formats.py", "conversations.py", "prefs.py", "encode.py")
# Below this many rows per process, starting processes (and copying the tokenizer to them) costs more
# than it saves: one process tokenizes ~100 rows of 1,400 tokens a second.
ROWS_PER_PROCESS = 1000
# Sources this large take a minute or more: datasets' map bar shows it is moving. Smaller ones finish in
# seconds, and their bar would only sit on stderr above a one-line data error (files.no_progress_bars).
BAR_ROWS = 10_000


def encode_rows(
    dataset,
    encode_row: Callable[[dict], dict],
    columns: dict[str, str],
    settings: dict,
    *,
    tokenizer,
    num_proc: int | None,
    label: str,
):
    """(the kept rows with their `columns`, Counter of drop reasons, sums of the `_` count columns).

    `columns` maps each output column to "ids" (a list of token ids), "mask" (a list of 0/1) or "count" (an
    integer; names starting with `_` are summed into the result and removed). `settings` is everything else the
    output depends on."""
    from datasets import Features, List, Value

    # int32 ids and int8 masks: the cache holds every token, and int64 made it 16 bytes a token instead of 5.
    kinds = {"ids": List(Value("int32")), "mask": List(Value("int8")), "count": Value("int64")}
    features = Features({**{name: kinds[kind] for name, kind in columns.items()}, DROP: Value("string")})
    empty = {name: 0 if kind == "count" else [] for name, kind in columns.items()}
    key = fingerprint(dataset, settings, tokenizer)
    procs = processes(num_proc, len(dataset))
    with bars_for(len(dataset)), sigterm_unwinds():  # so a SIGTERM still stops the workers
        mapped = _map_keeping_signals(
            dataset,
            _encode_batch,
            fn_kwargs={"encode_row": encode_row, "empty": empty, "parent": os.getpid()},
            batched=True,
            remove_columns=dataset.column_names,
            features=features,
            num_proc=procs if procs > 1 else None,
            new_fingerprint=key,
            desc=f"data: tokenizing {label}",
        )
        dropped = _reasons(mapped)
        sums = {name: _sum(mapped, name) for name in columns if name.startswith("_")}
        kept = (
            mapped
            if not dropped
            else mapped.filter(
                _kept,
                input_columns=DROP,
                batched=True,
                new_fingerprint=f"{key}-kept",
                desc=f"data: dropping unusable rows of {label}",
            )
        )
    return kept.remove_columns([DROP, *sums]), dropped, sums


def bars_for(rows: int):
    """datasets' progress bars for work on `rows` rows: shown from BAR_ROWS up, hidden below (a context manager)."""
    return no_progress_bars() if rows < BAR_ROWS else nullcontext()


def _map_keeping_signals(dataset, function, **kwargs):
    """dataset.map(function, **kwargs), re-raising a Ctrl-C or SIGTERM that datasets' pool buried under another
    exception (a TimeoutError while it waits for its workers, a RuntimeError when one has died)."""
    # A signal between two results closes datasets' result generator as the stack unwinds; its cleanup waits on
    # the stopped workers, and Python would print that TimeoutError as "Exception ignored in".
    hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unless_pool_cleanup, hook)
    try:
        return dataset.map(function, **kwargs)
    except BaseException as exc:
        cause = exc
        while cause is not None and not isinstance(cause, (KeyboardInterrupt, SystemExit)):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None
    finally:
        sys.unraisablehook = hook


def _unless_pool_cleanup(hook, unraisable) -> None:
    if getattr(unraisable.object, "__name__", None) != "iflatmap_unordered":
        hook(unraisable)


def _leave_ctrl_c_to_the_parent() -> None:
    """In a datasets worker: Ctrl-C reaches the whole process group, and the parent alone answers it. (SIGTERM needs
    nothing here: sigterm_unwinds' handler, inherited from the parent, kills a forked child as by default.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_batch(batch: dict[str, list], encode_row, empty: dict, parent: int) -> dict[str, list]:
    if os.getpid() != parent:  # a worker process of num_proc > 1
        _leave_ctrl_c_to_the_parent()
    out = {name: [] for name in (*empty, DROP)}
    for values in zip(*batch.values()):
        try:
            row, reason = encode_row(dict(zip(batch, values))), None
        except ValueError as exc:
            row, reason = empty, str(exc)
        for name in empty:
            out[name].append(row[name])
        out[DROP].append(reason)
    return out


def _kept(reasons: list) -> list[bool]:
    return [reason is None for reason in reasons]


def _reasons(mapped) -> Counter:
    """Drop reasons and their counts, read from Arrow (no Python list of every row)."""
    import pyarrow.compute as pc

    counts = pc.value_counts(mapped.data.column(DROP).drop_null()).to_pylist()
    return Counter({item["values"]: item["counts"] for item in counts})


def _sum(mapped, name: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(mapped.data.column(name)).as_py() or 0)


def processes(requested: int | None, rows: int) -> int:
    """data.num_proc, or (null) one process per ROWS_PER_PROCESS rows, up to this rank's share of the cores. Under a
    launcher only local rank 0 tokenizes (distributed.local_main_first), but the other ranks wait for it in a
    collective that may keep a core busy each (NCCL spins by default), so the cores are shared out all the same."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores // local_world_size(), rows // ROWS_PER_PROCESS))


def fingerprint(dataset, settings: dict, tokenizer) -> str:
    """The cache key of one encoding: every input the output depends on, hashed."""
    import mistral_common

    parts = {
        "source": dataset._fingerprint,  # datasets' own key of the rows (file, split, selection, columns)
        "settings": settings,
        "tokenizer": _tokenizer_hash(tokenizer),
        "mistral_common": mistral_common.__version__,
        "code": [hashlib.sha256((Path(__file__).parent / name).read_bytes()).hexdigest() for name in CODE],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _tokenizer_hash(tokenizer) -> str:
    inner = tokenizer.tokenizer.instruct_tokenizer.tokenizer  # MistralCommonBackend -> MistralTokenizer -> model
    path = getattr(inner, "file_path", None)
    if path is not None and Path(path).is_file():
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
