"""common.why_no_cuda: the clause that says why torch sees no GPU, from the machine's driver files."""

import pytest
import torch

from mixtral_ft.common import why_no_cuda

PROPRIETARY = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A GPU machine's driver file and /dev, with a CUDA build of torch (its version string only)."""
    driver, dev = tmp_path / "version", tmp_path / "dev"
    driver.write_text(PROPRIETARY)
    dev.mkdir()
    (dev / "nvidia0").touch()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return driver, dev


def test_no_driver_means_no_gpu(tmp_path):
    assert why_no_cuda(tmp_path / "absent", tmp_path) == "this machine has no NVIDIA driver"


def test_cpu_build_of_torch_on_a_gpu_machine(machine, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build: install a CUDA build" in why_no_cuda(*machine)


@pytest.mark.parametrize("value", ["", "-1", " "])
def test_cuda_visible_devices_that_hide_every_gpu(machine, monkeypatch, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert why_no_cuda(*machine) == f"CUDA_VISIBLE_DEVICES='{value}' hides every GPU"


def test_a_gpu_list_is_not_blamed(machine, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert "CUDA_VISIBLE_DEVICES" not in why_no_cuda(*machine)


def test_driver_without_device_nodes_is_a_container_without_gpus(machine):
    driver, dev = machine
    (dev / "nvidia0").unlink()
    assert "no GPU device is visible" in why_no_cuda(driver, dev) and "--gpus all" in why_no_cuda(driver, dev)


@pytest.mark.parametrize(("text", "version"), [(PROPRIETARY, "550.54.15"), (OPEN, "570.86.15"), ("odd\n", None)])
def test_a_torch_built_for_a_newer_cuda_names_both_versions(machine, text, version):
    driver, dev = machine
    driver.write_text(text)
    why = why_no_cuda(driver, dev)
    assert f"is built for CUDA 13.0, which NVIDIA driver {version or '(version unknown)'} may be too old" in why
    assert "nvidia-smi" in why
