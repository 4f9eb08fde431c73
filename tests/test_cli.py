"""Bad input through the CLI, end to end: exit 2, one `error:` line on stderr, no traceback, nothing overwritten.

Every case runs `mixtral-ft train` in-process on a scratch folder that already holds an output_dir with a file
in it; afterwards every file under the scratch folder must be byte-for-byte what it was. The layers underneath
have their own unit tests (tests/recipe/, tests/data/); this table checks what a user sees.
"""

import os
import re
from pathlib import Path

import pytest

from mixtral_ft.cli import main
from tests.conftest import chatml, convo, jsonl, snapshot

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
PROGRESS = re.compile(r"\d+%\||[?\d.]+ ?\w+/s\]")  # tqdm bars (datasets, model shards): not the message


GOOD = {"text": chatml(("user", "Hi"), ("assistant", "Hello!"))}

# (id, recipe overrides, {file: content} to create first, expected part of the message). {tmp} is the scratch
# folder; the output_dir is {tmp}/out unless a case sets another; a "recipe" entry replaces recipes/tiny.yaml.
RECIPES = [
    ("misspelled key", ["lora.alpah=16"], {}, "unknown key 'lora.alpah' (did you mean 'lora.alpha'?)"),
    ("misspelled section", ["trian.max_steps=5"], {}, "unknown key 'trian'"),
    ("alias of a key", ["data.dataset=x.jsonl"], {}, "did you mean 'data.path'"),
    ("unknown section", ["optimizer.lr=1"], {}, "unknown key 'optimizer'"),
    ("section not a mapping", ["data=builtin:oasst_top1"], {}, "'data' must be a mapping"),
    ("string for a list", ["lora.target_modules=5"], {}, "'lora.target_modules' must be a list of strings"),
    ("string for an int", ["train.per_device_train_batch_size=two"], {}, "must be an integer"),
    ("float for an int", ["lora.alpha=16.5"], {}, "'lora.alpha' must be an integer"),
    ("string for a bool", ["model.quantize_experts=yes please"], {}, "must be true or false"),
    ("list for a number", ["train.weight_decay=[0.1]"], {}, "'train.weight_decay' must be a number"),
    ("negative batch size", ["train.per_device_train_batch_size=-2"], {}, "must be > 0"),
    ("negative learning rate", ["train.learning_rate=-1e-4"], {}, "'train.learning_rate' must be > 0"),
    ("zero accumulation", ["train.gradient_accumulation_steps=0"], {}, "gradient_accumulation_steps' must be > 0"),
    ("negative warmup", ["train.warmup_ratio=-0.1"], {}, "'train.warmup_ratio' must be in [0, 1)"),
    ("negative seed", ["train.seed=-1"], {}, "'train.seed' must be >= 0"),
    ("tiny max_length", ["train.max_length=8"], {}, "'train.max_length' must be >= 16"),
    ("test_size of 1", ["data.test_size=1"], {}, "'data.test_size' must be in [0, 1)"),
    ("bad fraction > 1", ["data.max_bad_fraction=2"], {}, "'data.max_bad_fraction' must be in [0, 1]"),
    ("zero tokenizing processes", ["data.num_proc=0"], {}, "'data.num_proc' must be > 0 or null"),
    ("text for num_proc", ["data.num_proc=auto"], {}, "'data.num_proc' must be an integer"),
    ("unknown compute dtype", ["model.compute_dtype=fp16"], {}, "'model.compute_dtype' must be auto, bfloat16"),
    ("unknown optimizer", ["train.optim=adamw"], {}, "'train.optim' must be a transformers name, e.g. adamw_torch"),
    (
        "unknown scheduler",
        ["train.lr_scheduler_type=cosin"],
        {},
        "'train.lr_scheduler_type' must be a transformers name, e.g. cosine",
    ),
    ("unknown dataset format", ["data.format=csv"], {}, "'data.format' must be one of auto, messages, sharegpt"),
    ("secret in the recipe", ["model.hf_token=hf_abcdefgh"], {}, "looks like a secret"),
    ("push without a repo", ["hub.push=true"], {}, "'hub.repo_id' is required when hub.push is true"),
    ("override without =", ["train.max_steps"], {}, "is not key=value"),
    ("missing recipe file", ["recipe={tmp}/nope.yaml"], {}, "recipe file '{tmp}/nope.yaml' not found"),
    ("recipe not YAML", ["recipe={tmp}/bad.yaml"], {"bad.yaml": "model: [tiny\n"}, "is not valid YAML at line"),
    ("recipe is a list", ["recipe={tmp}/list.yaml"], {"list.yaml": "- model\n- data\n"}, "mapping of sections"),
    ("missing data file", ["data.path={tmp}/missing.jsonl"], {}, "data: file '{tmp}/missing.jsonl' not found"),
    ("missing data folder", ["data.path={tmp}/no/such/dir"], {}, "data: '{tmp}/no/such/dir' not found"),
    ("data file of another type", ["data.path={tmp}/rows.csv"], {"rows.csv": "a,b\n"}, "unsupported extension"),
    (
        "split a file lacks",
        ["data.path={tmp}/d.jsonl", "data.split=test"],
        {"d.jsonl": jsonl(GOOD)},
        "only a 'train' split",
    ),
    ("missing model folder", ["model.name={tmp}/no_model"], {}, "is neither a local folder nor a hub id"),
    (
        "model folder without config",
        ["model.name={tmp}/empty_model"],
        {"empty_model/notes.txt": "x"},
        "has no config.json",
    ),
    (
        "missing adapter folder",
        ["model.adapter={tmp}/no_adapter"],
        {},
        "model.adapter '{tmp}/no_adapter' is not an adapter folder",
    ),
    ("output_dir is a file", ["train.output_dir={tmp}/afile"], {"afile": "x"}, "is a file: choose a folder"),
    ("output_dir under a file", ["train.output_dir={tmp}/afile/sub"], {"afile": "x"}, "is not writable"),
    ("output_dir holds a run", [], {"out/run.json": "{}", "out/adapter_model.safetensors": "x"}, "already holds a run"),
    (
        "unfinished run, resume off",
        ["train.resume=false"],
        {"out/checkpoint-2/trainer_state.json": "{}"},
        "holds checkpoints of an unfinished run: set train.resume=auto",
    ),
    ("resume=true, nothing to resume", ["train.resume=true"], {}, "holds no complete checkpoint"),
    ("resume from a missing folder", ["train.resume={tmp}/ckpt"], {}, "is not a complete checkpoint (not a folder)"),
    (
        "resume from a partial checkpoint",
        ["train.resume={tmp}/out/checkpoint-9"],
        {"out/checkpoint-9/trainer_state.json": '{"global_step": 9}'},
        "(no adapter_model.safetensors)",
    ),
]

# The data file is {tmp}/data.jsonl unless the content's key names another.
DATA = [
    ("empty file", {"data.jsonl": ""}, [], "has no rows"),
    ("blank lines only", {"data.jsonl": "\n  \n\n"}, [], "has no rows"),
    ("not JSON", {"data.jsonl": "user: hi\nassistant: hello\n"}, [], "line 1 of '{tmp}/data.jsonl' is not valid JSON"),
    ("JSON, then garbage", {"data.jsonl": jsonl(GOOD) + "{'text': 'single quotes'}\n"}, [], "line 2 of"),
    ("truncated JSON list", {"data.json": '[{"text": "a"}, {"te'}, ["data.path={tmp}/data.json"], "cannot read"),
    ("non-UTF-8 bytes", {"data.jsonl": b'{"text": "caf\xe9"}\n'}, [], "is not UTF-8"),
    (
        "missing fields",
        {"data.jsonl": jsonl({"prompt": "a", "response": "b"})},
        [],
        "has columns ['prompt', 'response'], which match no format we know",
    ),
    (
        "unknown roles",
        {"data.jsonl": jsonl(*[convo(("wizard", "Hi"), ("assistant", "Yo"))] * 5)},
        [],
        "unknown role 'wizard'",
    ),
    (
        "same role twice",
        {"data.jsonl": jsonl(*[convo(("user", "a"), ("user", "b"), ("assistant", "c"))] * 5)},
        [],
        "two user turns in a row",
    ),
    (
        "empty assistant turn",
        {"data.jsonl": jsonl(*[convo(("user", "Hi"), ("assistant", "  "))] * 5)},
        [],
        "empty assistant turn",
    ),
    (
        "assistant speaks first",
        {"data.jsonl": jsonl(*[convo(("assistant", "Hi"), ("user", "?"))] * 5)},
        [],
        "first turn is assistant",
    ),
    ("turns as a string", {"data.jsonl": jsonl(*[{"messages": "user: hi"}] * 5)}, [], "not a list of turns"),
    ("text as a number", {"data.jsonl": jsonl(*[{"text": 42}] * 5)}, [], "text is not a string"),
    (
        "unclosed ChatML",
        {"data.jsonl": jsonl(*[{"text": "<|im_start|>user\nHi"}] * 5)},
        [],
        "ChatML turn without <|im_end|>",
    ),
    (
        "too many bad rows",
        {"data.jsonl": jsonl(*[GOOD] * 7, *[{"text": "plain"}] * 3)},
        [],
        "30% of rows in {tmp}/data.jsonl [train] are unparseable",
    ),
    (
        "over-long rows",
        {"data.jsonl": jsonl(*[convo(("user", "word " * 60), ("assistant", "ok"))] * 3)},
        ["train.max_length=16"],
        "no usable rows",
    ),
    (
        "folder without data",
        {"dataset/notes.md": "# nothing"},
        ["data.path={tmp}/dataset"],
        "cannot load local dataset folder",
    ),
]


def run_bad(tmp_path, capsys, overrides, files, extra=()):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    before = snapshot(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in [*overrides, *extra]]
    recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), TINY)
    args = [f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2"] + [
        a for a in args if not a.startswith("recipe=")
    ]
    capsys.readouterr()
    code = main(["train", recipe, *args])
    err = capsys.readouterr().err
    message = [s for s in re.split(r"[\r\n]", err) if s.strip() and not PROGRESS.search(s)]
    assert code == 2, err[-1500:]
    assert "Traceback" not in err
    assert len(message) == 1 and message[0].startswith("error: "), message
    assert snapshot(tmp_path) == before  # nothing written over, nothing half-written left behind
    return message[0]


@pytest.mark.parametrize("overrides, files, fix", [c[1:] for c in RECIPES], ids=[c[0] for c in RECIPES])
def test_bad_recipe(tmp_path, capsys, overrides, files, fix):
    message = run_bad(tmp_path, capsys, overrides, files)
    assert fix.replace("{tmp}", str(tmp_path)) in message


@pytest.mark.parametrize("files, extra, fix", [c[1:] for c in DATA], ids=[c[0] for c in DATA])
def test_bad_data(tmp_path, capsys, files, extra, fix):
    overrides = [f"data.path={{tmp}}/{next(iter(files))}"] if not any("data.path" in e for e in extra) else []
    message = run_bad(tmp_path, capsys, [*overrides, "data.test_size=0"], files, extra)
    assert message.startswith("error: data:")
    assert fix.replace("{tmp}", str(tmp_path)) in message


def test_the_tables_are_big_enough():
    assert len(RECIPES) >= 30 and len(DATA) >= 10


def test_tiny_interrupted_leaves_no_half_model_and_can_run_again(tmp_path, monkeypatch, capsys):
    import mixtral_ft.data.tokenizer

    def interrupted(*args, **kwargs):  # Ctrl-C after the weights, before the tokenizer
        raise KeyboardInterrupt

    out = tmp_path / "tiny"
    with monkeypatch.context() as patch:
        patch.setattr(mixtral_ft.data.tokenizer, "save_tokenizer", interrupted)
        assert main(["tiny", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []
    assert main(["tiny", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model.v1").is_file()


def test_validate_set_overrides_every_recipe(tmp_path, capsys):
    dpo = str(ROOT / "recipes" / "tiny_dpo.yaml")
    assert main(["validate", TINY, dpo]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok: {TINY}", f"ok: {dpo}"]
    assert main(["validate", TINY, dpo, "--set", "lora.r=8", "--set", "train.max_steps=0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("'train.max_steps'" in line for line in err)  # the last --set, on both recipes


@pytest.mark.slow
def test_a_full_disk_outside_train_is_one_line_exit_74_and_leaves_no_half_folder(tmp_path):
    import resource
    import subprocess
    import sys

    def small_files():  # in the child: no file may grow past 100 kB, as on a full disk (EFBIG, not SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "tiny"
    env = {**os.environ, "MIXTRAL_FT_CACHE": str(tmp_path / "cache")}  # a cache to build, so it must write
    proc = subprocess.run(
        [sys.executable, "-m", "mixtral_ft.cli", "tiny", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=small_files,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: storage failure") and "File too large" in lines[0], lines
    assert "run the same command again" in lines[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []
