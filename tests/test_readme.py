"""README is the contract: its two set-up commands, CI running the second, and a complete recipe reference."""

import dataclasses
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

from mixtral_ft.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def first_screen_commands() -> list[list[str]]:
    """The command lines of each fenced block before README's first section heading (comments dropped)."""
    first_screen = README.split("\n## ", 1)[0]
    assert len(first_screen.splitlines()) <= 30, "the set-up commands must stay on README's first screen"
    blocks = re.findall(r"^```bash\n(.*?)^```", first_screen, flags=re.M | re.S)
    return [
        [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")] for block in blocks
    ]


def test_first_screen_has_the_two_commands():
    blocks = first_screen_commands()
    assert len(blocks) == 2, "README's first screen holds exactly two fenced commands: train tiny, then test"
    assert all(len(lines) == 1 for lines in blocks), "each fenced block is one copy-pasteable command line"
    train, test = blocks[0][0], blocks[1][0]
    for command in (train, test):
        assert command.startswith("python3 -m venv ") and " pip install " in command and " -e " in command
        assert "torch==2.13.0" in command  # the CPU wheel before anything pulls CUDA torch
    assert train.endswith("mixtral-ft train recipes/tiny.yaml") and "pytest" not in train
    assert '".[dev]"' in test and "ruff check ." in test and " pytest " in test


def ci_extraction() -> str:
    """The shell pipeline `.ci/run` uses to pull README's test command out (its `command=$(...)` line)."""
    ci = (ROOT / ".ci" / "run").read_text()
    [grep] = re.findall(r"^command=\$\((.+)\)$", ci, flags=re.M)
    return grep


def test_ci_extracts_exactly_readmes_second_command():
    grep = ci_extraction()
    assert "README.md" in grep
    extracted = subprocess.run(["bash", "-c", grep], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert extracted.rstrip("\n") == first_screen_commands()[1][0]


def test_ci_runs_the_extracted_command_not_a_copy(tmp_path):
    ci = (ROOT / ".ci" / "run").read_text()
    code = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    # pytest appears only in the extraction and in the numeric second pass (CPU bf16 detection flipped): the
    # test command itself is nowhere else in the script.
    second_pass = [line for line in code if "pytest" in line and "MIXTRAL_FT_CPU_BF16=" in line]
    assert [line for line in code if "pytest" in line and line not in second_pass] == [f"command=$({ci_extraction()})"]
    assert any('-m "numeric and not gpu"' in line for line in second_pass)
    assert 'bash -c "$command"' in code
    # Run the real script on a stand-in README: it must execute whatever README's test command says.
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(
        "# stand-in\n\n```bash\npython3 -m venv --help > /dev/null && echo trained\n```\n\n"
        "```bash\npython3 -m venv --help > /dev/null && echo 'ran pytest' > ran.txt\n```\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text("#!/bin/sh\n")  # present, so the script installs nothing
    (bin_dir / "chromium").chmod(0o755)
    # The venv README's command made: a stand-in python that answers the bf16 probe and records the second pass.
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(
        '#!/bin/sh\nif [ "$1" = -c ]; then echo 1; else echo "$MIXTRAL_FT_CPU_BF16 $*" > numeric.txt; fi\n'
    )
    venv_python.chmod(0o755)

    def run_ci():
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        return subprocess.run(["bash", ".ci/run"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)

    result = run_ci()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ran.txt").read_text() == "ran pytest\n"
    assert (tmp_path / "numeric.txt").read_text() == "0 -m pytest -q -m numeric and not gpu\n"
    # A README without a test command fails CI instead of passing vacuously.
    (tmp_path / "README.md").write_text("# stand-in\n")
    result = run_ci()
    assert result.returncode != 0 and "lost its test command" in result.stderr


def documented_keys(reference: str) -> set[str]:
    """`section.key` for each key a row of the reference table documents: the keys in its first cell, and
    keys named with their default in its meaning cell, e.g. `lr_scheduler_type` (`cosine`)."""
    keys = set()
    for row in re.findall(r"^\| (`.+)$", reference, flags=re.M):
        key_cell, _, meaning = (cell.strip() for cell in row.split(" | ", 2))
        names = re.findall(r"`([\w.]+)`", key_cell)
        section = names[0].split(".")[0]
        names += re.findall(r"`(\w+)` \(`", meaning)
        keys |= {name if "." in name else f"{section}.{name}" for name in names}
    return keys


def test_recipe_reference_documents_every_key():
    reference = README.split("## Recipe reference", 1)[1].split("\n## ", 1)[0]
    documented = documented_keys(reference)
    for section, section_type in typing.get_type_hints(Recipe).items():
        for f in dataclasses.fields(section_type):
            assert f"{section}.{f.name}" in documented, f"README's recipe reference lacks {section}.{f.name}"


def pipeline_table() -> dict[str, set[str]]:
    """README's pipeline table: folder (or "" for the package's top level) -> the module files it names."""
    section = README.split("## The pipeline", 1)[1].split("\n## ", 1)[0]
    named: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (`.+)$", section, flags=re.M):
        place, job = (cell.strip() for cell in row.rstrip("|").split(" | ", 1))
        folders = re.findall(r"`(\w+)/`", place)
        folder = folders[0] if folders else ""
        named.setdefault(folder, set()).update(re.findall(r"`(\w+\.py)`", place if not folders else job))
    return named


def test_pipeline_table_names_every_module_and_only_real_ones():
    package = ROOT / "mixtral_ft"
    named = pipeline_table()
    for folder, files in named.items():
        real = {p.name for p in (package / folder).glob("*.py")} - {"__init__.py", "__main__.py"}
        if folder:
            assert files == real, (
                f"README's pipeline row `{folder}/`: names {sorted(files - real)} that do not exist, "
                f"lacks {sorted(real - files)}"
            )
        else:
            assert files <= real, (
                f"README's pipeline table names top-level modules that do not exist: {sorted(files - real)}"
            )
    top_level = {p.name for p in package.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert top_level <= named[""], f"README's pipeline table lacks {sorted(top_level - named[''])}"
    stages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert stages == set(named) - {""}, (
        f"README's pipeline table and the package's folders differ: {sorted(stages ^ (set(named) - {''}))}"
    )


def documented_defaults(reference: str) -> dict[str, str]:
    """`section.key` -> the default README's reference table gives it (the backticked text), where it gives one:
    the keys of the first cell zipped with the default cell's values, and `key` (`default`) in the meaning cell."""
    defaults = {}
    for row in re.findall(r"^\| (`.+)$", reference, flags=re.M):
        key_cell, default_cell, meaning = (cell.strip() for cell in row.rstrip("|").split(" | ", 2))
        keys = re.findall(r"`([\w.]+)`", key_cell)
        section = keys[0].split(".")[0]
        keys = [key if "." in key else f"{section}.{key}" for key in keys]
        values = re.findall(r"`([^`]+)`", default_cell)
        if values:
            assert len(values) == len(keys), f"README's recipe reference: {keys} have defaults {values}"
            defaults.update(zip(keys, values))
        defaults.update((f"{section}.{k}", v) for k, v in re.findall(r"`(\w+)` \(`([^`]+)`\)", meaning))
    return defaults


def test_recipe_reference_keys_and_defaults_are_the_schemas():
    import yaml

    reference = README.split("## Recipe reference", 1)[1].split("\n## ", 1)[0]
    fields = {
        f"{section}.{f.name}": f
        for section, section_type in typing.get_type_hints(Recipe).items()
        for f in dataclasses.fields(section_type)
    }
    assert documented_keys(reference) <= set(fields), (
        f"README documents {sorted(documented_keys(reference) - set(fields))}"
    )
    defaults = documented_defaults(reference)
    assert len(defaults) > 40
    for key, text in defaults.items():
        f = fields[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = yaml.safe_load(text)
        if isinstance(value, str) and isinstance(default, float):
            value = float(value)  # 2e-4: YAML 1.1 reads it as a string, the recipe as the number it is
        if isinstance(default, tuple):
            default = list(default)
        assert value == default, f"README says {key} defaults to {text}; the schema says {default!r}"


def user_docs() -> dict[str, str]:
    """What a user reads: README, the notebooks' cells, the recipes' and accelerate configs' comments, NOTES."""
    import json

    paths = [ROOT / "README.md", ROOT / "benchmarks" / "NOTES.md"]
    paths += sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "accelerate_configs").glob("*.yaml"))
    docs = {str(p.relative_to(ROOT)): p.read_text() for p in paths}
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        docs[str(p.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells)
    return docs


def command_flags() -> dict[str, set[str]]:
    """Each `mixtral-ft` command and the options its parser accepts (bench has its own parser)."""
    import argparse

    from mixtral_ft.bench.args import build_parser as bench_parser
    from mixtral_ft.cli import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    flags["bench"] = {o for a in bench_parser()._actions for o in a.option_strings}
    return flags


def test_documented_command_lines_use_real_commands_and_flags():
    flags = command_flags()
    checked = 0
    for name, text in user_docs().items():
        # A command line ends at the end of its code span, table cell or line; a shell comment is not part of it.
        for command, rest in re.findall(r"`?mixtral-ft ([a-z]+)([^`|\n]*)", text):
            if command in ("trian", "commands", "has"):  # README's did-you-mean example; notebooks' prose
                continue
            assert command in flags, f"{name}: `mixtral-ft {command}` is not a command"
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest.split(" #")[0]):
                assert flag in flags[command], f"{name}: `mixtral-ft {command}` has no option {flag}"
                checked += 1
    assert checked > 30


def test_documented_recipe_keys_exist():
    fields = {
        f"{section}.{f.name}"
        for section, section_type in typing.get_type_hints(Recipe).items()
        for f in dataclasses.fields(section_type)
    }
    for name, text in user_docs().items():
        keys = re.findall(r"(?<![\w./-])((?:model|data|lora|train|dpo|logging|hub)\.\w+)", text)
        # Less README's example of the unknown-key error, and module names (`dpo.py`).
        unknown = {key for key in keys if not key.endswith(".py")} - fields - {"lora.rank"}
        assert not unknown, f"{name} mentions recipe keys the schema lacks: {sorted(unknown)}"


def test_documented_repository_paths_exist():
    # Not in the repository on purpose: the folder gpu_collect.py makes, and alignment-handbook's recipe.
    elsewhere = {"benchmarks/results", "recipes/zephyr-7b-beta/dpo/config_qlora.yaml"}
    top = r"(?:recipes|tests|benchmarks|accelerate_configs|requirements|notebooks|docs|mixtral_ft|\.ci)"
    for name, text in user_docs().items():
        paths = set(re.findall(rf"(?<![\w./-])({top}/[\w./-]*\w)", text)) - elsewhere
        missing = sorted(p for p in paths if not (ROOT / p).exists())
        assert not missing, f"{name} names paths that do not exist: {missing}"
