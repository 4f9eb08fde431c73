"""Which rows a run trains and evaluates on: the sources of `data.path` or `data.mixture`, held out and mixed.

Reading one source is files.py's job. `load_sources` gives the train and eval rows of `data.path` or of each
`data.mixture` source, mixed by weight; the encoders (conversations.py for conversations, prefs.py for
preference pairs) pass in how one split is read and tokenized, as a plain function argument.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mixtral_ft.errors import UserError
from mixtral_ft.recipe import DataSection

if TYPE_CHECKING:
    from datasets import Dataset


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
    prompts_shortened: int = 0  # DPO: kept pairs whose prompt lost old exchanges or its start (prefs.fit_pair)
    held_out: int = 0  # kept rows held out for eval by data.test_size: never trained on

    def line(self) -> str:
        total = sum(self.dropped.values())
        text = f"data: {self.source}: " + (f"format {self.format}, " if self.format else "")
        text += f"read {self.read}, kept {self.kept}"
        text += f" ({self.held_out} held out for eval)" if self.held_out else ""
        text += f", dropped {total}"
        if total:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in _by_count(self.dropped)) + ")"
        if self.trailing_user_dropped:
            text += f"; {self.trailing_user_dropped} unanswered last user turn(s) cut"
        if self.prompts_shortened:
            text += f"; {self.prompts_shortened} long prompt(s) shortened"
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
        one = dataclasses.replace(
            cfg,
            path=source.path,
            split=source.split,
            eval_split=source.eval_split,
            format=source.format or cfg.format,
            max_rows=source.max_rows or cfg.max_rows,
            mixture=(),
            mixture_size=None,
        )
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
            raise UserError(
                f"data: cannot hold out data.test_size={cfg.test_size} of {len(train)} rows of "
                f"{cfg.path} ({exc}); use more data or set data.test_size: 0"
            ) from None
        train, eval_set = parts["train"], parts["test"]
        report.held_out = len(eval_set)
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
        indices = np.concatenate(
            [np.tile(np.arange(len(train)), repeats), rng.choice(len(train), rest, replace=False)]
        ).astype(int)
        chosen.append(train.select(indices))
        reports[0].sampled = f"weight {weight:.2f}, {n} of {total} rows ({n / len(train):.2f}x)"
    mixed = concatenate_datasets(chosen)
    mixed = mixed.select(rng.permutation(len(mixed)))  # interleave the sources, reproducibly
    evals = [eval_set for _, eval_set, _ in parts if eval_set is not None]
    reports = [report for _, _, source_reports in parts for report in source_reports]
    return SFTData(train=mixed, eval=concatenate_datasets(evals) if evals else None, reports=reports)


def settle(
    report: SourceReport, dropped: Counter, cfg: DataSection, label: str, *, not_bad: str | None, empty_fix: str
) -> None:
    """Record the drops; stop the run when too many rows are bad or none is left. Rows dropped for `not_bad`
    (a length setting, not bad data) don't count towards data.max_bad_fraction."""
    report.dropped = dict(_by_count(dropped))
    bad = report.read - report.kept - dropped[not_bad]
    reasons = ", ".join(f"{r}: {n}" for r, n in _by_count(dropped))
    read_as = f" (read as {report.format})" if report.format else ""
    if report.kept == 0 and bad == report.read:  # raising data.max_bad_fraction cannot help: nothing parsed
        raise UserError(
            f"data: no row of {label}{read_as} could be used ({reasons}); fix the data, or set "
            "data.format if the rows are in another format"
        )
    if bad / report.read > cfg.max_bad_fraction:
        raise UserError(
            f"data: {100 * bad / report.read:.0f}% of rows in {label} are unparseable "
            f"(top reasons: {reasons}); fix the data or raise data.max_bad_fraction "
            f"(now {cfg.max_bad_fraction})"
        )
    if report.kept == 0:
        raise UserError(f"data: no usable rows in {label} ({reasons}); {empty_fix}")


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
