"""The notebooks: committed clean and parameterised, and each one executes on CPU with the tiny model.

CI runs them the papermill way with nbclient: a cell of overrides goes in right after the cell tagged
`parameters`, then the notebook executes top to bottom in a `python3` kernel from this environment.
"""

import time
from pathlib import Path

import pytest

from tests.test_chat import trained_adapter

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
        "01_quickstart_tiny": {"OUTPUT_DIR": str(tmp / "quickstart"), "MAX_STEPS": 2, "MAX_NEW_TOKENS": 4,
                               "EVAL_ROWS": 3},
        # 02 on the shared run: its training cell then takes the "already trained" branch; 01 trains.
        "02_sft_oasst_mixtral": {"MODEL": "tiny", "RECIPE": "recipes/tiny.yaml", "OUTPUT_DIR": str(adapter),
                                 "MAX_STEPS": 2, "EVAL_ROWS": 3, "SAMPLES": 1, "MAX_NEW_TOKENS": 4},
        "03_dpo": {"SFT_ADAPTER": str(adapter), "OUTPUT_ROOT": str(tmp / "dpo"), "MAX_STEPS": 2,
                   "MAX_NEW_TOKENS": 4},
        "04_merge_and_push": {"ADAPTER": str(adapter), "MERGED_DIR": str(tmp / "merged"),
                              "REPO_ID": "example-org/tiny-mixtral-sft", "MAX_NEW_TOKENS": 4},
    }[name]


def inject(nb, values: dict) -> None:
    from nbformat.v4 import new_code_cell

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


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
    started = time.time()
    # Run from notebooks/, as Jupyter would; the notebooks move to the repository root themselves.
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    elapsed = time.time() - started
    text = stream_text(nb)
    assert elapsed < 3 * CELL_TIMEOUT_S
    if name == "01_quickstart_tiny":
        assert "saved to " in text and "adapter " in text and "perplexity" in text
    if name == "02_sft_oasst_mixtral":
        assert "training skipped" in text and "adapter " in text and "perplexity" in text
    if name == "03_dpo":
        assert "note: DPO is not available" in text or "'method': 'dpo'" in text
    if name == "04_merge_and_push":
        assert "dry run" in text or "skipped: push" in text
