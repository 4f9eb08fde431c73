"""What `mixtral-ft eval` writes and prints: eval.json, and the scores as a small table with the samples."""

from __future__ import annotations

import json
from pathlib import Path

from mixtral_ft.use.pair_eval import render_pair_scores


def write_report(report: dict, out_path: Path) -> None:
    """eval.json (replacing an earlier report), then the report as a table on stdout."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(render(report))
    print(f"wrote {out_path}")


def render(report: dict) -> str:
    """Scores as a small table, then each sample with its reference and one line per variant."""
    pairs = "answer_tokens" in report
    names = list(report["scores"])
    lines = render_pair_scores(report) if pairs else loss_lines(report)
    for i, sample in enumerate(report["samples"], 1):
        lines.append(f"\n[{i}] prompt:    {_short(sample['prompt'])}")
        given = ("chosen", "rejected") if pairs else ("reference",)
        lines += [f"    {n + ':':10} {_short(sample[n])}" for n in (*given, *names)]
    return "\n".join(lines)


def loss_lines(report: dict) -> list[str]:
    scores = report["scores"]
    names = list(scores)
    lines = [
        f"eval: {report['rows']} rows, {report['assistant_tokens']} assistant tokens ({report['data']})",
        f"{'':8} {'loss':>10} {'perplexity':>14}",
    ]
    lines += [f"{n:8} {scores[n]['loss']:>10.4f} {scores[n]['perplexity']:>14,.2f}" for n in names]
    if len(names) == 2:
        lines.append(f"{'change':8} {scores['adapter']['loss'] - scores[names[0]]['loss']:>+10.4f}")
    return lines


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
