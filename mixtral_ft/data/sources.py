"""Where rows come from: the bundled samples, local files, dataset folders, hub ids, and mixtures of them.

Every failure to read becomes a one-line `UserError` naming the source and the fix. `load_sources` gives
the train and eval rows of `data.path` or of each `data.mixture` source, mixed by weight; the format
modules (data.py for conversations, prefs.py for preference pairs) supply how one split is tokenized.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection

if TYPE_CHECKING:
    from datasets import Dataset

BUILTIN = {"oasst_top1": str(Path(__file__).parent / "sample_data" / "oasst_top1.jsonl"),
           "preferences": str(Path(__file__).parent / "sample_data" / "preferences.jsonl")}
LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_ROW_BYTES = 8 * 2**20  # one JSON Lines row; a 32k-token conversation is well under 1 MiB


@dataclass
class SourceReport:
    source: str  # e.g. "builtin:oasst_top1 [train]"
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    sampled: str | None = None  # mixtures: the source's share of the mixed train set
    format: str | None = None  # e.g. "alpaca (auto-detected)"
    supervised_tokens: int | None = None  # SFT: tokens the loss is on (after truncation)
    trailing_user_dropped: int = 0  # kept conversations whose unanswered last user turn was cut

    def line(self) -> str:
        total = sum(self.dropped.values())
        text = f"data: {self.source}: " + (f"format {self.format}, " if self.format else "")
        text += f"read {self.read}, kept {self.kept}, dropped {total}"
        if total:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in _by_count(self.dropped)) + ")"
        if self.trailing_user_dropped:
            text += f"; {self.trailing_user_dropped} unanswered last user turn(s) cut"
        if self.supervised_tokens is not None:
            text += f"; {self.supervised_tokens:,} supervised tokens"
        if self.sampled:
            text += f"; mixture: {self.sampled}"
        return text


@dataclass
class SFTData:
    train: Dataset  # columns input_ids, assistant_masks
    eval: Dataset | None
    reports: list[SourceReport]


def load_sources(cfg: DataSection, load_split, *, seed: int) -> SFTData:
    """Train and eval rows of `data.path` or of each `data.mixture` source, mixed by weight.

    `load_split(cfg_of_one_source, split)` returns (Dataset, SourceReport). Each source's eval rows come from
    its eval split, or are held out (data.test_size) before sampling, so no eval row is ever trained on.
    """
    if cfg.path is not None or not cfg.mixture:  # recipes can't set both; a replace(cfg, path=FILE) means FILE
        return SFTData(*_train_and_eval(cfg, load_split, seed))
    parts = []
    for source in cfg.mixture:
        one = dataclasses.replace(cfg, path=source.path, split=source.split, eval_split=source.eval_split,
                                  format=source.format or cfg.format, max_rows=source.max_rows or cfg.max_rows,
                                  mixture=(), mixture_size=None)
        parts.append(_train_and_eval(one, load_split, seed))
    return mix(parts, [s.weight for s in cfg.mixture], cfg.mixture_size, seed)


def _train_and_eval(cfg: DataSection, load_split, seed: int):
    train, report = load_split(cfg, cfg.split)
    reports = [report]
    eval_set = None
    if cfg.eval_split:
        eval_set, eval_report = load_split(cfg, cfg.eval_split)
        reports.append(eval_report)
    elif cfg.test_size > 0:
        try:
            parts = train.train_test_split(test_size=cfg.test_size, seed=seed)
        except ValueError as exc:
            raise UserError(f"data: cannot hold out data.test_size={cfg.test_size} of {len(train)} rows of "
                            f"{cfg.path} ({exc}); use more data or set data.test_size: 0") from None
        train, eval_set = parts["train"], parts["test"]
    return train, eval_set, reports


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Rows per source: weight/sum(weights) of `total`, rounded so that they add up to `total` exactly."""
    weights = _normalized(weights)
    shares = [w * total for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _normalized(weights: list[float]) -> list[float]:
    # Scaled by the largest first: 1e308 + 1e308 would overflow to inf and turn every share into 0 or nan.
    top = max(weights)
    scaled = [w / top for w in weights]
    return [w / sum(scaled) for w in scaled]


def mix(parts: list[tuple], weights: list[float], size: int | None, seed: int) -> SFTData:
    """One train set from (train, eval, reports) per source. The total is `size` (data.mixture_size) or the
    sum of the sources' train rows; a source asked for more rows than it has is repeated whole, then sampled."""
    import numpy as np
    from datasets import concatenate_datasets

    rng = np.random.default_rng(seed)
    total = size or sum(len(train) for train, _, _ in parts)
    chosen = []
    for (train, _, reports), weight, n in zip(parts, _normalized(weights), mixture_counts(weights, total)):
        repeats, rest = divmod(n, len(train))
        indices = np.concatenate([np.tile(np.arange(len(train)), repeats),
                                  rng.choice(len(train), rest, replace=False)]).astype(int)
        chosen.append(train.select(indices))
        reports[0].sampled = f"weight {weight:.2f}, {n} of {total} rows ({n / len(train):.2f}x)"
    mixed = concatenate_datasets(chosen)
    mixed = mixed.select(rng.permutation(len(mixed)))  # interleave the sources, reproducibly
    evals = [eval_set for _, eval_set, _ in parts if eval_set is not None]
    reports = [report for _, _, source_reports in parts for report in source_reports]
    return SFTData(train=mixed, eval=concatenate_datasets(evals) if evals else None, reports=reports)


def read_rows(cfg: DataSection, split: str):
    """The raw rows of one source's split (at most data.max_rows) and its label for messages."""
    dataset = _read_source(cfg.path, split)
    label = f"{cfg.path} [{split}]"
    if cfg.max_rows is not None and len(dataset) > cfg.max_rows:
        dataset = dataset.select(range(cfg.max_rows))
    if len(dataset) == 0:
        raise UserError(f"data: {label} has no rows; check data.path and data.split")
    return dataset, label


def settle(report: SourceReport, dropped: Counter, cfg: DataSection, label: str, *, not_bad: str | None,
           empty_fix: str) -> None:
    """Record the drops; stop the run when too many rows are bad or none is left. Rows dropped for `not_bad`
    (a length setting, not bad data) don't count towards data.max_bad_fraction."""
    report.dropped = dict(_by_count(dropped))
    bad = report.read - report.kept - dropped[not_bad]
    reasons = ", ".join(f"{r}: {n}" for r, n in _by_count(dropped))
    read_as = f" (read as {report.format})" if report.format else ""
    if report.kept == 0 and bad == report.read:  # raising data.max_bad_fraction cannot help: nothing parsed
        raise UserError(f"data: no row of {label}{read_as} could be used ({reasons}); fix the data, or set "
                        "data.format if the rows are in another format")
    if bad / report.read > cfg.max_bad_fraction:
        raise UserError(f"data: {100 * bad / report.read:.0f}% of rows in {label} are unparseable "
                        f"(top reasons: {reasons}); fix the data or raise data.max_bad_fraction "
                        f"(now {cfg.max_bad_fraction})")
    if report.kept == 0:
        raise UserError(f"data: no usable rows in {label} ({reasons}); {empty_fix}")


def _read_source(path: str, split: str):
    """The named split of a source as a datasets.Dataset, with every failure turned into a UserError."""
    import datasets

    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise UserError(f"data: unknown built-in dataset '{name}'; use one of {[f'builtin:{n}' for n in BUILTIN]}")
        return _read_file(Path(BUILTIN[name]), path, split)
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if suffix in LOCAL_LOADERS:
        if not local.is_file():
            raise UserError(f"data: file '{path}' not found; fix data.path (relative paths are from the "
                            "current directory) or use builtin:oasst_top1 for the bundled sample")
        return _read_file(local, path, split)
    if local.is_file():
        raise UserError(f"data: '{path}' has an unsupported extension '{suffix}'; "
                        "use .jsonl, .json or .parquet")
    if local.is_dir() and saved_kind(local):
        return _read_saved(local, path, split)
    if local.is_dir():
        where = f"local dataset folder '{path}'"
        fix = "check the folder holds data files (.jsonl/.json/.parquet/.csv) and the split exists"
    elif path.startswith((".", "/", "~")):
        raise UserError(f"data: '{path}' not found; fix data.path")
    else:
        where = f"hub dataset '{path}'"
        fix = ("check the id and split, your network, and `huggingface-cli login` for gated datasets; "
               "or pass a local .jsonl/.json/.parquet file")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as exc:  # datasets/hub raise many unrelated types; each means "cannot load this"
        raise UserError(f"data: cannot load {where} (split '{split}'): {_why(exc)}; {fix}") from None


def saved_kind(folder: Path) -> str | None:
    """"dataset" or "dataset_dict" for a `save_to_disk` folder (load_dataset cannot read those), else None."""
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
            raise UserError(f"data: saved dataset '{label}' has splits {list(saved)}, not '{split}'; "
                            "set data.split (and data.eval_split) to one of them")
        return saved[split]
    if split != "train":
        raise UserError(f"data: '{label}' was saved from one Dataset, which is read as the 'train' split, not "
                        f"'{split}'; set data.split: train, and data.test_size (not data.eval_split) for eval")
    return saved


def _read_file(file: Path, label: str, split: str):
    import datasets

    if split != "train":
        raise UserError(f"data: {label} is a single file with only a 'train' split, not '{split}'; "
                        "set data.split: train, and data.test_size (not data.eval_split) for eval")
    loader = LOCAL_LOADERS[file.suffix.lower()]
    if loader == "json":
        check_json_text(file, label)
    try:
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
                raise UserError(f"data: line {number} of '{label}' is longer than {MAX_ROW_BYTES // 2**20} MiB: "
                                "a row that size cannot fit train.max_length; remove or split it")
            try:
                line = decoder.decode(raw).strip()
            except UnicodeDecodeError:
                raise UserError(f"data: line {number} of '{label}' is not UTF-8 text; "
                                "re-save the file as UTF-8") from None
            if line and not json_list:
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"data: line {number} of '{label}' is not valid JSON ({exc.msg}); "
                                    "each line of a .jsonl file must be one JSON object") from None
            read += len(raw)
            if max_bytes is not None and read >= max_bytes:
                return
    if json_list is None:
        raise UserError(f"data: '{label}' has no rows; check data.path")


def _why(exc: BaseException) -> str:
    from datasets.exceptions import DatasetGenerationError

    # The generic "error while generating the dataset" wraps the useful message (e.g. pyarrow's).
    while isinstance(exc, DatasetGenerationError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else 'no details'}"


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
