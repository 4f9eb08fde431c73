"""eval, merge and quantize say what they are doing on stderr while they work (stdout keeps the result)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mixtral_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
LINE = re.compile(r"^(eval|merge|quantize): \[\d+s\] ", re.M)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "run"
    assert (
        main(
            [
                "train",
                TINY,
                f"train.output_dir={out}",
                "train.max_steps=1",
                "train.save_steps=1",
                "logging.router_stats_steps=0",
            ]
        )
        == 0
    )
    return out


def progress(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if LINE.match(line) and line.startswith(command)]


def test_eval_reports_each_phase(adapter, capsys):
    capsys.readouterr()
    assert main(["eval", str(adapter), "--max-rows", "2", "--samples", "2", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    lines = progress(err, "eval")
    assert any("loading tiny with the adapter" in line for line in lines)
    assert any("base: scoring 2 rows" in line for line in lines) and any(
        "adapter: scoring 2 rows" in line for line in lines
    )
    assert sum("generating sample" in line for line in lines) == 4  # 2 samples x (base, adapter)
    assert "eval: [" not in out  # progress stays off stdout


def test_merge_reports_each_shard(adapter, tmp_path, capsys):
    capsys.readouterr()
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    lines = progress(capsys.readouterr().err, "merge")
    assert any("LoRA weights from" in line for line in lines)
    assert any(re.search(r"shard 1/\d+ \(", line) for line in lines)


def test_quantize_reports_each_phase(tmp_path, capsys):
    assert main(["quantize", "tiny", str(tmp_path / "nf4")]) == 0
    lines = progress(capsys.readouterr().err, "quantize")
    assert [line.split("] ", 1)[1].split(" ")[0] for line in lines] == ["resolving", "loading", "writing"]
