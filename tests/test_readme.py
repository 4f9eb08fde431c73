"""README is the contract: its two set-up commands, CI running the second, and a complete recipe reference."""

import dataclasses
import re
import typing
from pathlib import Path

from mixtral_ft.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_screen_has_the_two_commands():
    first_screen = "\n".join(README.splitlines()[:20])
    commands = re.findall(r"^python3 -m venv .*$", first_screen, flags=re.M)
    assert len(commands) == 2
    assert commands[0].endswith("mixtral-ft train recipes/tiny.yaml")
    assert "pytest" in commands[1]
    assert all("torch==2.13.0" in c for c in commands)  # the CPU wheel before anything pulls CUDA torch


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "pytest" in ci


def test_recipe_reference_documents_every_key():
    reference = README.split("## Recipe reference", 1)[1].split("\n## ", 1)[0]
    for section, section_type in typing.get_type_hints(Recipe).items():
        for f in dataclasses.fields(section_type):
            assert f"{section}.{f.name}" in reference or f"`{f.name}`" in reference or f", {f.name}" in reference, \
                f"README's recipe reference lacks {section}.{f.name}"
