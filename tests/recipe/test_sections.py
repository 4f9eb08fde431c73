"""Recipe strictness: every error names the key and the fix, and exits 2 without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixtral_ft.cli import main
from mixtral_ft.errors import UserError
from mixtral_ft.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"


def test_overrides_are_parsed_as_yaml():
    recipe = load_recipe(
        TINY,
        [
            "lora.r=8",
            "lora.target_modules=[q_proj,v_proj]",
            "data.max_rows=null",
            "train.learning_rate=1e-4",
            "train.packing=true",
        ],
    )
    assert recipe.lora.r == 8
    assert recipe.lora.target_modules == ("q_proj", "v_proj")
    assert recipe.data.max_rows is None
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.train.packing is True


# The defaults README's recipe reference documents, written out: a changed default must change this table
# (and README) on purpose.
DOCUMENTED_DEFAULTS = {
    "model": {
        "quantize_experts": True,
        "compute_dtype": "auto",
        "revision": None,
        "adapter": None,
        "attn_implementation": "sdpa",
    },
    "data": {
        "split": "train",
        "eval_split": None,
        "test_size": 0.0,
        "format": "auto",
        "max_bad_fraction": 0.1,
        "max_rows": None,
        "num_proc": None,
        "mixture": [],
        "mixture_size": None,
    },
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "allow_other_targets": False,
        "use_rslora": False,
    },
    "train": {
        "method": "sft",
        "max_steps": -1,
        "num_train_epochs": 1.0,
        "save_steps": 500,
        "save_total_limit": None,
        "seed": 42,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "max_grad_norm": 0.3,
        "optim": "adamw_torch",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_length": 2048,
        "packing": False,
        "gradient_checkpointing": True,
        "compile": False,
        "reuse_dequantized": False,
        "skip_checkpoint_layers": 0,
        "liger": False,
        "assistant_only_loss": True,
        "logging_steps": 1,
        "eval_steps": None,
        "overwrite": False,
        "resume": "auto",
        "router_aux_loss_coef": 0.0,
        "check_fit": True,
        "neftune_noise_alpha": None,
    },
    "hub": {"push": False, "repo_id": None, "private": True},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "max_prompt_length": 512},
    "logging": {"report_to": ["none"], "project": "mixtral-ft", "run_name": None, "router_stats_steps": 10},
}


def test_a_minimal_recipe_gets_the_documented_defaults(tmp_path):
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text("model: {name: tiny}\ndata: {path: builtin:oasst_top1}\ntrain: {output_dir: out}\n")
    resolved = load_recipe(minimal).to_dict()
    expected = {section: dict(values) for section, values in DOCUMENTED_DEFAULTS.items()}
    expected["model"]["name"] = "tiny"
    expected["data"]["path"] = "builtin:oasst_top1"
    expected["train"]["output_dir"] = "out"
    assert resolved == expected


def test_tiny_recipe_resolves_to_its_file_values_over_the_defaults():
    r = load_recipe(TINY)
    assert (r.model.name, r.data.path, r.data.split, r.data.test_size) == ("tiny", "builtin:oasst_top1", "train", 0.1)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (16, 32, 0.05)
    assert r.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (r.train.output_dir, r.train.max_steps, r.train.save_steps, r.train.seed) == ("runs/tiny", 20, 10, 42)
    assert r.train.learning_rate == pytest.approx(5e-3)
    assert (r.train.per_device_train_batch_size, r.train.max_length, r.train.logging_steps) == (2, 256, 5)
    # Keys the file leaves out take the documented defaults.
    assert (r.train.method, r.train.optim, r.train.packing) == ("sft", "adamw_torch", False)
    assert r.model.compute_dtype == "auto" and r.logging.report_to == ("none",)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_value_a_shipped_recipe_sets_is_the_value_loaded(path):
    raw = yaml.safe_load(path.read_text())
    resolved = load_recipe(path).to_dict()
    for section, values in raw.items():
        for key, value in values.items():
            assert resolved[section][key] == value, f"{path.name}: {section}.{key}"


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (["lora.rank=8"], "lora.rank", "did you mean 'lora.r'"),
        (["train.lr=0.1"], "train.lr", "did you mean 'train.learning_rate'"),
        (["bogus.key=1"], "bogus", "valid keys here are"),
        (["lora.r=0"], "lora.r", "must be > 0"),
        (["lora.r=-4"], "lora.r", "must be > 0"),
        (["lora.r=eight"], "lora.r", "must be an integer"),
        (["train.learning_rate=0"], "train.learning_rate", "must be > 0"),
        (["train.learning_rate=fast"], "train.learning_rate", "must be a number"),
        (["lora.dropout=1.5"], "lora.dropout", "[0, 1)"),
        (["lora.target_modules=[q_proj,embed_tokens]"], "lora.target_modules", "allow_other_targets"),
        (["lora.target_modules=[]"], "lora.target_modules", "at least one"),
        (["train.output_dir=null"], "train.output_dir", "missing required key"),
        (["model.name=null"], "model.name", "missing required key"),
        (["train.max_steps=2.5"], "train.max_steps", "must be an integer"),
        (["train.max_steps=0"], "train.max_steps", "-1 to train by epochs"),
        (["train.packing=maybe"], "train.packing", "true or false"),
        (["train.save_steps=0"], "train.save_steps", "must be > 0"),
        (["train.save_total_limit=1"], "train.save_total_limit", "must be >= 2"),
        (["train.save_total_limit=0"], "train.save_total_limit", "or null to keep all"),
        (["train.save_total_limit=2.5"], "train.save_total_limit", "must be an integer"),
        (["train.neftune_noise_alpha=0"], "train.neftune_noise_alpha", "must be > 0"),
        (["train.neftune_noise_alpha=-5"], "train.neftune_noise_alpha", "or null to turn it off"),
        (["train.neftune_noise_alpha=loud"], "train.neftune_noise_alpha", "must be a number"),
        (["lora.use_rslora=maybe"], "lora.use_rslora", "true or false"),
        (["data.format=csv"], "data.format", "alpaca, prompt_completion"),
        (["hub.token=hf_abc"], "hub.token", "HF_TOKEN"),
        (["model.api_key=xyz"], "model.api_key", "hf auth login"),
        (["model=3"], "model", "must be a mapping"),
        (["oops"], "oops", "key=value"),
    ],
)
def test_bad_recipes_name_the_key(overrides, key, fix):
    with pytest.raises(UserError) as info:
        load_recipe(TINY, overrides)
    message = str(info.value)
    assert key in message and fix in message
    assert "\n" not in message


def test_neftune_is_refused_for_dpo():
    dpo = str(ROOT / "recipes" / "tiny_dpo.yaml")
    with pytest.raises(UserError, match=r"^'train.neftune_noise_alpha' applies to SFT only .*: set it to null$"):
        load_recipe(dpo, ["train.neftune_noise_alpha=5"])
    assert load_recipe(dpo, ["train.save_total_limit=2", "lora.use_rslora=true"]).lora.use_rslora is True
    recipe = load_recipe(TINY, ["train.neftune_noise_alpha=5", "train.save_total_limit=3"])
    assert (recipe.train.neftune_noise_alpha, recipe.train.save_total_limit) == (5.0, 3)


def test_allow_other_targets_opts_in():
    recipe = load_recipe(TINY, ["lora.target_modules=[q_proj,embed_tokens]", "lora.allow_other_targets=true"])
    assert "embed_tokens" in recipe.lora.target_modules


def test_lm_head_is_refused_even_with_allow_other_targets():
    """TRL's fused LM head bypasses it in training (tests/model/test_load.py shows it), yet chat would apply it."""
    with pytest.raises(UserError, match="lora.target_modules.*fused LM head.*drop lm_head"):
        load_recipe(TINY, ["lora.target_modules=[q_proj,lm_head]", "lora.allow_other_targets=true"])


@pytest.mark.parametrize(
    "targets, fix",
    [
        # peft skips a name that matches no module while another one matches: a typo trained without a word.
        ("q_proj,q_prj", "no Mixtral module has that name"),
        ("q_proj,gate_up_proj", "no Mixtral module has that name"),  # a parameter of the experts, not a module
        # On NF4 experts peft failed with a traceback (w1+w3) or an unrelated fix (w1 alone).
        ("q_proj,w1,w3", "drop them, or set model.quantize_experts: false"),
    ],
)
def test_targets_allow_other_targets_would_not_make_work_are_refused_first(targets, fix):
    """Each was told `set lora.allow_other_targets: true`, after which LoRA still did not go there."""
    for allow in ("false", "true"):
        with pytest.raises(UserError, match=fix) as err:
            load_recipe(TINY, [f"lora.target_modules=[{targets}]", f"lora.allow_other_targets={allow}"])
        assert "set lora.allow_other_targets: true to override" not in str(err.value)


def test_expert_targets_on_bf16_experts_come_as_a_pair():
    bf16 = ["model.quantize_experts=false", "lora.allow_other_targets=true"]
    with pytest.raises(UserError, match="w1, w3: peft fuses them"):
        load_recipe(TINY, [*bf16, "lora.target_modules=[q_proj,w1]"])
    assert load_recipe(TINY, [*bf16, "lora.target_modules=[q_proj,w1,w3]"]).lora.target_modules[1:] == ("w1", "w3")


def test_lm_head_error_does_not_point_at_allow_other_targets():
    """Without allow_other_targets the fix named is the one that works: drop lm_head, not opt in to other targets."""
    with pytest.raises(UserError, match="fused LM head.*drop lm_head") as err:
        load_recipe(TINY, ["lora.target_modules=[q_proj,lm_head]"])
    assert "allow_other_targets" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a folder: pass a YAML recipe file"):
        load_recipe(tmp_path)
    with pytest.raises(UserError, match=r"KEY=VALUE override goes after the recipe .* or after --set \(validate\)"):
        load_recipe("lora.r=8")  # `validate recipe.yaml lora.r=8` reads the override as a second recipe
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


def test_cli_validate_names_the_fix_for_an_override_or_a_folder(capsys):
    """`validate R lora.r=8` (train's habit) and a folder both said "recipe file ... not found"."""
    folder = ROOT / "recipes"
    assert main(["validate", str(TINY), "lora.r=8", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"ok: {TINY}\n"
    assert captured.err.splitlines() == [
        "error: lora.r=8: 'lora.r=8' is an override, not a recipe: validate takes it as --set lora.r=8",
        f"error: {folder}: recipe '{folder}' is a folder: pass a YAML recipe file, e.g. recipes/tiny.yaml",
    ]


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for recipe in recipes:
        assert main(["validate", str(recipe)]) == 0, recipe
        assert recipe.read_text().startswith("# mixtral-ft "), f"{recipe} must start with its launch command"


@pytest.mark.slow
def test_console_script_error_is_one_line_exit_2(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mixtral_ft.cli", "train", str(TINY), "lora.rank=3", f"train.output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown key 'lora.rank' (did you mean 'lora.r'?)"
    assert "Traceback" not in proc.stderr
    assert not out.exists()
