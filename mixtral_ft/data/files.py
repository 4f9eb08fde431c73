"""Reading one source's rows: the bundled samples, local .jsonl/.json/.parquet files, dataset folders (also
`save_to_disk` ones) and hub dataset ids. Every failure becomes a one-line `UserError` naming the source and
the fix; JSON Lines are checked row by row (size, encoding) before `datasets` reads them.
"""

from __future__ import annotations

import codecs
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection

BUILTIN = {
    "oasst_top1": str(Path(__file__).parent / "sample_data" / "oasst_top1.jsonl"),
    "preferences": str(Path(__file__).parent / "sample_data" / "preferences.jsonl"),
}
LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# A mixture entry has its own split and eval_split (data.split / data.eval_split are refused beside a mixture).
TRAIN_ONLY_FIX = (
    "set data.split: train, and data.test_size (not data.eval_split) for eval; in data.mixture, set that "
    "entry's split: train and drop its eval_split"
)
MAX_ROW_BYTES = 8 * 2**20  # one JSON Lines row; a 32k-token conversation is well under 1 MiB


def read_rows(cfg: DataSection, split: str):
    """The raw rows of one source's split (at most data.max_rows) and its label for messages."""
    dataset = _read_source(cfg.path, split)
    label = f"{cfg.path} [{split}]"
    if cfg.max_rows is not None and len(dataset) > cfg.max_rows:
        dataset = dataset.select(range(cfg.max_rows))
    if len(dataset) == 0:
        raise UserError(f"data: {label} has no rows; check data.path and data.split")
    return dataset, label


def locate(path: str) -> tuple[str, Path | None]:
    """What `data.path` names, without reading it: ("file", a .jsonl/.json/.parquet file; builtins too),
    ("folder", a local dataset folder) or ("hub", None). A UserError when it cannot be any of them."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise UserError(f"data: unknown built-in dataset '{name}'; use one of {[f'builtin:{n}' for n in BUILTIN]}")
        return "file", Path(BUILTIN[name])
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if suffix in LOCAL_LOADERS:
        if not local.is_file():
            raise UserError(
                f"data: file '{path}' not found; fix data.path (relative paths are from the "
                "current directory) or use builtin:oasst_top1 for the bundled sample"
            )
        return "file", local
    if local.is_file():
        raise UserError(f"data: '{path}' has an unsupported extension '{suffix}'; use .jsonl, .json or .parquet")
    if local.is_dir():
        return "folder", local
    if path.startswith((".", "/", "~")):
        raise UserError(f"data: '{path}' not found; fix data.path")
    return "hub", None


def _read_source(path: str, split: str):
    """The named split of a source as a datasets.Dataset, with every failure turned into a UserError."""
    import datasets

    kind, local = locate(path)
    if kind == "file":
        return _read_file(local, path, split)
    if kind == "folder" and saved_kind(local):
        return _read_saved(local, path, split)
    if kind == "folder":
        where = f"local dataset folder '{path}'"
        fix = "check the folder holds data files (.jsonl/.json/.parquet/.csv) and the split exists"
    else:
        where = f"hub dataset '{path}'"
        fix = (
            "check the id and split, your network, and `hf auth login` for gated datasets; "
            "or pass a local .jsonl/.json/.parquet file"
        )
    try:
        with no_progress_bars() if kind == "folder" else nullcontext():  # a hub download keeps its bars
            return datasets.load_dataset(path, split=split)
    except Exception as exc:  # datasets/hub raise many unrelated types; each means "cannot load this"
        raise UserError(f"data: cannot load {where} (split '{split}'): {_why(exc)}; {fix}") from None


def saved_kind(folder: Path) -> str | None:
    """ "dataset" or "dataset_dict" for a `save_to_disk` folder (load_dataset cannot read those), else None."""
    if (folder / "dataset_dict.json").is_file():
        return "dataset_dict"
    return "dataset" if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file() else None


def _read_saved(folder: Path, label: str, split: str):
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as exc:  # a damaged folder: arrow and json errors of many types
        raise UserError(f"data: cannot read the saved dataset '{label}': {_why(exc)}; save it again") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(
                f"data: saved dataset '{label}' has splits {list(saved)}, not '{split}'; "
                "set data.split (and data.eval_split) to one of them"
            )
        return saved[split]
    if split != "train":
        raise UserError(
            f"data: '{label}' was saved from one Dataset, which is read as the 'train' split, not "
            f"'{split}'; {TRAIN_ONLY_FIX}"
        )
    return saved


def check_file_source(file: Path, label: str, split: str, max_bytes: int | None = None) -> None:
    """A single data file has only a 'train' split, and JSON text is checked row by row (up to `max_bytes`)."""
    if split != "train":
        raise UserError(f"data: {label} is a single file with only a 'train' split, not '{split}'; {TRAIN_ONLY_FIX}")
    if LOCAL_LOADERS[file.suffix.lower()] == "json":
        check_json_text(file, label, max_bytes)


def _read_file(file: Path, label: str, split: str):
    import datasets

    check_file_source(file, label, split)
    loader = LOCAL_LOADERS[file.suffix.lower()]
    try:
        with no_progress_bars():
            return datasets.load_dataset(loader, data_files=str(file), split="train")
    except Exception as exc:  # malformed JSON and broken Parquet arrive as assorted wrapped errors
        kind = "JSON Lines (or one JSON list of objects)" if loader == "json" else "Parquet"
        raise UserError(f"data: cannot read '{label}' as {kind}: {_why(exc)}; fix the file") from None


def check_json_text(file: Path, label: str, max_bytes: int | None = None) -> None:
    """One streaming pass (the first `max_bytes` only, if given): UTF-8, one JSON value per line, rows of at most
    MAX_ROW_BYTES. pyarrow accepts invalid UTF-8 and fails later, mid-iteration, its JSON errors name no line, and
    it would tokenize a giant row for minutes before max_length drops it: here each gets a line number instead."""
    json_list = None
    read = 0
    decoder = codecs.getincrementaldecoder("utf-8")()  # a JSON list's long line arrives in chunks
    with open(file, "rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_ROW_BYTES + 1), b""), 1):
            if json_list is None and raw.strip():
                json_list = raw.lstrip().startswith(b"[")  # one JSON list of rows: left to datasets' parser
            if len(raw.rstrip(b"\r\n")) > MAX_ROW_BYTES and not json_list:
                raise UserError(
                    f"data: line {number} of '{label}' is longer than {MAX_ROW_BYTES // 2**20} MiB: "
                    "a row that size cannot fit train.max_length; remove or split it"
                )
            try:
                line = decoder.decode(raw).strip()
            except UnicodeDecodeError:
                raise UserError(
                    f"data: line {number} of '{label}' is not UTF-8 text; re-save the file as UTF-8"
                ) from None
            if line and not json_list:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"data: line {number} of '{label}' is not valid JSON ({exc.msg}); "
                        "each line of a .jsonl file must be one JSON object"
                    ) from None
                if not isinstance(row, dict):  # pyarrow's own error names no line ("changed from object to ...")
                    raise UserError(
                        f"data: line {number} of '{label}' is a JSON {_json_kind(row)}, not an object; "
                        'each line of a .jsonl file must be one JSON object ({"column": value, ...})'
                    )
            read += len(raw)
            if max_bytes is not None and read >= max_bytes:
                return
    if json_list is None:
        raise UserError(f"data: '{label}' has no rows; check data.path")


def _json_kind(value) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", type(None): "null", int: "number", float: "number"}
    return kinds.get(type(value), type(value).__name__)


@contextmanager
def no_progress_bars():
    """datasets draws a "Generating train split" bar for each new local file: seconds at most, and often right
    before the one-line error about that file's columns, which would then not be the only line on stderr."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _why(exc: BaseException) -> str:
    from datasets.exceptions import DatasetGenerationError

    # The generic "error while generating the dataset" wraps the useful message (e.g. pyarrow's).
    while isinstance(exc, DatasetGenerationError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else 'no details'}"
