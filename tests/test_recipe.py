"""Recipe strictness: every error names the key and the fix, and exits 2 without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixtral_ft.cli import main
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def test_overrides_are_parsed_as_yaml():
    recipe = load_recipe(TINY, ["lora.r=8", "lora.target_modules=[q_proj,v_proj]", "data.max_rows=null",
                                "train.learning_rate=1e-4", "train.packing=true"])
    assert recipe.lora.r == 8
    assert recipe.lora.target_modules == ("q_proj", "v_proj")
    assert recipe.data.max_rows is None
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.train.packing is True


def test_required_keys_exist_with_documented_names():
    r = load_recipe(TINY)
    for value in (r.model.name, r.data.path, r.data.split, r.lora.r, r.lora.alpha, r.lora.dropout,
                  r.lora.target_modules, r.train.output_dir, r.train.max_steps, r.train.save_steps,
                  r.train.seed, r.train.learning_rate):
        assert value is not None


@pytest.mark.parametrize("overrides, key, fix", [
    (["lora.rank=8"], "lora.rank", "did you mean 'lora.r'"),
    (["train.lr=0.1"], "train.lr", "did you mean 'train.learning_rate'"),
    (["bogus.key=1"], "bogus", "valid keys here are"),
    (["lora.r=0"], "lora.r", "must be > 0"),
    (["lora.r=-4"], "lora.r", "must be > 0"),
    (["lora.r=eight"], "lora.r", "must be an integer"),
    (["train.learning_rate=0"], "train.learning_rate", "must be > 0"),
    (["train.learning_rate=fast"], "train.learning_rate", "must be a number"),
    (["lora.dropout=1.5"], "lora.dropout", "[0, 1)"),
    (["lora.target_modules=[q_proj,w1]"], "lora.target_modules", "allow_other_targets"),
    (["lora.target_modules=[]"], "lora.target_modules", "at least one"),
    (["train.output_dir=null"], "train.output_dir", "missing required key"),
    (["model.name=null"], "model.name", "missing required key"),
    (["train.max_steps=2.5"], "train.max_steps", "must be an integer"),
    (["train.max_steps=0"], "train.max_steps", "-1 to train by epochs"),
    (["train.packing=maybe"], "train.packing", "true or false"),
    (["train.save_steps=0"], "train.save_steps", "must be > 0"),
    (["data.format=csv"], "data.format", "alpaca, prompt_completion"),
    (["hub.token=hf_abc"], "hub.token", "HF_TOKEN"),
    (["model.api_key=xyz"], "model.api_key", "huggingface-cli login"),
    (["model=3"], "model", "must be a mapping"),
    (["oops"], "oops", "key=value"),
])
def test_bad_recipes_name_the_key(overrides, key, fix):
    with pytest.raises(UserError) as info:
        load_recipe(TINY, overrides)
    message = str(info.value)
    assert key in message and fix in message
    assert "\n" not in message


def test_allow_other_targets_opts_in():
    recipe = load_recipe(TINY, ["lora.target_modules=[q_proj,lm_head]", "lora.allow_other_targets=true"])
    assert "lm_head" in recipe.lora.target_modules


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(UserError, match="mapping of sections"):
        load_recipe(scalar)


def test_cli_validate_reports_each_recipe(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    raw = yaml.safe_load(TINY.read_text())
    raw["lora"]["rank"] = 4
    broken.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(TINY)]) == 0
    assert main(["validate", str(TINY), str(broken)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lora.rank' (did you mean 'lora.r'?)" in err


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for recipe in recipes:
        assert main(["validate", str(recipe)]) == 0, recipe
        assert recipe.read_text().startswith("# mixtral-ft "), f"{recipe} must start with its launch command"


@pytest.mark.slow
def test_console_script_error_is_one_line_exit_2(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mixtral_ft.cli", "train", str(TINY), "lora.rank=3",
                           f"train.output_dir={out}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown key 'lora.rank' (did you mean 'lora.r'?)"
    assert "Traceback" not in proc.stderr
    assert not out.exists()
