"""run.json's memory by phase: the load peak, the loaded model and the training peak (train/memory.py)."""

import json
import mmap

import pytest
import torch

from mixtral_ft.train.memory import PhaseMemory
from tests.conftest import TINY_RECIPE, requires_cuda, trained_adapter

MIB_128 = 2**27
PAGE = mmap.PAGESIZE


def resident_pages(size: int) -> mmap.mmap:
    """Fresh anonymous pages, each touched so it is resident.

    Not torch tensors: malloc may hand back heap that earlier tests freed but the process still holds, and
    then RSS (so the peak) does not move at all (CI saw load peak == model, 1.222 GiB each).
    """
    pages = mmap.mmap(-1, size)
    for offset in range(0, size, PAGE):
        pages[offset] = 1
    return pages


def test_phases_on_cpu_separate_the_load_peak_from_what_stays():
    memory = PhaseMemory(torch.device("cpu"))
    memory.loading()
    kept = resident_pages(MIB_128)  # the model that stays
    transient = resident_pages(MIB_128)  # one layer's bf16 experts, freed once quantized
    transient.close()  # munmap: the pages leave RSS at once
    memory.loaded()
    summary = memory.summary()
    assert summary["device"] == "cpu" and summary["rank"] == 0 and "VmRSS" in summary["source"]
    assert summary["load_peak_gib"] >= summary["model_gib"] + 0.1  # the freed 128 MiB counted in the peak only
    if summary["peaks_reset_between_phases"]:  # the kernel allowed resetting VmHWM
        assert summary["train_peak_gib"] < summary["load_peak_gib"] - 0.1
    assert round(memory.overall_peak_gib(), 3) >= summary["load_peak_gib"]  # summary rounds to the MiB
    kept.close()


@pytest.mark.slow
def test_run_json_records_memory_by_phase(tmp_path_factory):
    run = json.loads((trained_adapter(tmp_path_factory) / "run.json").read_text())
    memory = run["memory"]
    assert memory["device"] == "cpu" and memory["rank"] == 0
    assert memory["load_peak_gib"] > 0 and memory["model_gib"] > 0 and memory["train_peak_gib"] > 0
    assert memory["load_peak_gib"] >= memory["model_gib"]
    # The old single figure stays, as the higher of the two peaks.
    assert run["peak_memory_gib"] == pytest.approx(max(memory["load_peak_gib"], memory["train_peak_gib"]), abs=2e-3)
    card = (trained_adapter(tmp_path_factory) / "README.md").read_text()
    assert f"| memory (cpu, rank 0) | load peak {memory['load_peak_gib']} GiB" in card


@pytest.mark.slow
@pytest.mark.gpu
@requires_cuda
def test_run_json_memory_on_cuda_counts_allocated_tensors(tmp_path):
    from mixtral_ft.cli import main

    out = tmp_path / "run"
    assert main(["train", TINY_RECIPE, f"train.output_dir={out}", "train.max_steps=2", "train.save_steps=2"]) == 0
    memory = json.loads((out / "run.json").read_text())["memory"]
    assert memory["device"].startswith("cuda") and memory["peaks_reset_between_phases"]
    # The tiny model is a few MiB of tensors: allocator figures, not the process's GiB of libraries.
    assert 0 < memory["model_gib"] <= memory["load_peak_gib"] < 0.5
    assert 0 < memory["train_peak_gib"] < 0.5
