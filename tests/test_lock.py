"""The locked test environment (requirements/lock.txt) agrees with pyproject's ranges and README's commands."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
TORCH = ROOT / "requirements" / "torch.txt"
tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as the lock is


def pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: '{line}' is not an exact pin"
            out[canonicalize_name(name)] = Version(version)
    return out


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["web"]]]


def test_every_locked_version_satisfies_pyproject():
    locked = {**pins(LOCK), **pins(TORCH)}
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not locked: refresh the lock (README)"
        assert req.specifier.contains(locked[name], prereleases=True), f"locked {name}=={locked[name]} vs {req}"


def test_lock_holds_no_cuda_packages_and_readme_installs_with_it():
    names = pins(LOCK)
    assert "torch" not in names  # pinned by requirements/torch.txt and README: the CPU build in CI
    assert not [n for n in names if n.startswith("nvidia-") or n == "triton"]
    torch_pin = f"torch=={pins(TORCH)['torch']}"
    commands = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    for command in commands:
        assert re.search(rf"pip install {re.escape(torch_pin)} .* -c requirements/lock\.txt", command), command
