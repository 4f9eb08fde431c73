"""The notebooks: committed clean and parameterised, and each one executes on CPU with the tiny model.

CI runs them the papermill way with nbclient: a cell of overrides goes in right after the cell tagged
`parameters`, then the notebook executes top to bottom in a `python3` kernel from this environment.
"""

import json
from pathlib import Path

import pytest

from tests.conftest import trained_adapter

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart_tiny", "02_sft_oasst_mixtral", "03_dpo", "04_merge_and_push"]
CELL_TIMEOUT_S = 180


def read(name: str):
    import nbformat

    return nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)


def overrides(name: str, tmp: Path, adapter: Path) -> dict:
    """CPU-sized parameters per notebook; a shared tiny adapter spares 03 and 04 a training run."""
    return {
        "01_quickstart_tiny": {
            "OUTPUT_DIR": str(tmp / "quickstart"),
            "MAX_STEPS": 2,
            "MAX_NEW_TOKENS": 4,
            "EVAL_ROWS": 3,
        },
        # 02 trains its own 2 steps: the training cell must run, not take the "already trained" branch.
        "02_sft_oasst_mixtral": {
            "MODEL": "tiny",
            "RECIPE": "recipes/tiny.yaml",
            "OUTPUT_DIR": str(tmp / "sft"),
            "MAX_STEPS": 2,
            "EVAL_ROWS": 3,
            "SAMPLES": 1,
            "MAX_NEW_TOKENS": 4,
        },
        "03_dpo": {"SFT_ADAPTER": str(adapter), "OUTPUT_ROOT": str(tmp / "dpo"), "MAX_STEPS": 2, "MAX_NEW_TOKENS": 4},
        "04_merge_and_push": {
            "ADAPTER": str(adapter),
            "MERGED_DIR": str(tmp / "merged"),
            "REPO_ID": "example-org/tiny-mixtral-sft",
            "MAX_NEW_TOKENS": 4,
        },
    }[name]


def inject(nb, values: dict) -> None:
    from nbformat.v4 import new_code_cell

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def stream_text(nb, name: str = "stdout") -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "stream" and o.get("name") == name
    )


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def skipped_lines(text: str) -> list[str]:
    """The notebooks' "section not run" messages: each says `skipped`."""
    return [line for line in text.splitlines() if "skipped" in line]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_clean_and_parameterised(name):
    nb = read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged `parameters`"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "strip outputs before committing"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # The overrides CI injects name parameters the notebook really has.
    defined = {line.split("=")[0].strip() for line in code[0].source.splitlines() if "=" in line}
    assert set(overrides(name, Path("/tmp"), Path("/tmp"))) <= defined


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_on_cpu(name, tmp_path, tmp_path_factory):
    from nbclient import NotebookClient

    adapter = trained_adapter(tmp_path_factory)
    nb = read(name)
    inject(nb, overrides(name, tmp_path, adapter))
    # Run from notebooks/, as Jupyter would; the notebooks move to the repository root themselves.
    NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    text = stream_text(nb)
    # On CPU with the tiny model every section has its real path: nothing may print a "skipped" note.
    # (Only 03's SFT section is spared a run: it is handed the shared adapter, and says which one.)
    assert skipped_lines(text) == [], text
    check_outputs(name, text, nb, tmp_path, adapter)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def check_outputs(name: str, text: str, nb, tmp: Path, adapter: Path) -> None:
    """What each notebook's CPU-runnable sections must have produced."""
    if name in ("01_quickstart_tiny", "02_sft_oasst_mixtral"):
        out = tmp / ("quickstart" if name == "01_quickstart_tiny" else "sft")
        assert (out / "adapter_model.safetensors").is_file()
        run = read_json(out / "run.json")
        assert run["steps"] == 2 and "loss by step: 1: " in text
        report = read_json(out / "eval.json")
        assert set(report["scores"]) == {"base", "adapter"} and report["rows"] == 3
        assert "adapter  loss " in text and "perplexity" in text
        assert f"$ mixtral-ft chat {out} --prompt" in text
    if name == "02_sft_oasst_mixtral":
        assert "$ mixtral-ft plan recipes/tiny.yaml" in text
        assert (tmp / "sft" / "router_heatmap.png").is_file() and images(nb) == 1
    if name == "03_dpo":
        dpo = tmp / "dpo" / "dpo"
        run = read_json(dpo / "run.json")
        assert run["method"] == "dpo" and run["steps"] == 2 and "'method': 'dpo'" in text
        assert f"SFT adapter: {adapter}" in text
        assert text.index("--- SFT\n$ mixtral-ft chat") < text.index("--- DPO\n$ mixtral-ft chat")
        assert set(read_json(dpo / "eval.json")["scores"]) == {"base", "adapter"}
        pairs = read_json(dpo / "eval_pairs.json")  # held-out pairs, against the SFT adapter DPO started from
        assert list(pairs["scores"]) == ["base", "reference", "adapter"] and "'reference': 'reference'" in text
    if name == "04_merge_and_push":
        merged = tmp / "merged"
        assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
        verify = read_json(merged / "verify.json")
        assert verify and all(f'"{key}":' in text for key in verify)  # the cell printed it
        assert "--- merged model\n$ mixtral-ft chat" in text
        assert "dry run: would push" in text and "example-org/tiny-mixtral-sft" in text
