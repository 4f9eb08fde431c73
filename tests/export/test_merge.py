"""Merge and push: the merged model is adapter-on-NF4-base, loads with plain transformers, and reaches the Hub.

One tiny training run (in a subprocess, with `hub.push: true`) feeds every test; its push, and the CLI
pushes, go to a local HTTP stand-in for the Hub that records what huggingface_hub sends.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixtral_ft.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
pytestmark = pytest.mark.numeric  # .ci/run runs these again with the CPU bf16 detection forced the other way
HF_SENTINEL = "hf_sentinelTOKEN0123456789abcdef"
WANDB_SENTINEL = "wandbsentinel0123456789abcdef0123456789"
# The bf16 merge is judged relative to the logits' scale (mean |logit|): bf16 rounds each merged weight
# by <= 2^-9 (0.2%), NF4 moves it by up to ~7% of its block's absmax, and the logits inherit that ~50x
# ratio. On the tiny model a bf16 merge into the NF4 weights is off by ~1% of mean |logit| and a merge
# into the original weights by ~60%, so 5% accepts the first and rejects the second.
BF16_REL_TOL = 0.05
FP32_MAX_TOL = 1e-4  # fp32 merge: only summation order differs from adapter-on-base


class _HubStandIn(BaseHTTPRequestHandler):
    """Answers the endpoints create_repo and upload_folder use (huggingface_hub 2.x) and records each call."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        call = {
            "path": self.path,
            "auth": self.headers.get("Authorization"),
            "body": lines if len(lines) != 1 else lines[0],
        }
        self.server.calls.append(call)
        base = f"http://127.0.0.1:{self.server.server_port}"
        route = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/", self.path)
        if self.path == "/api/repos/create":
            payload = call["body"]
            self._answer(200, {"url": f"{base}/{payload['organization']}/{payload['name']}"})
        elif self.path == "/api/validate-yaml":
            self._answer(200, {"errors": [], "warnings": []})
        elif route and route[2] == "preupload":  # "regular": contents travel in the commit, no LFS round
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in call["body"]["files"]]
            self._answer(200, {"files": files})
        elif route:
            oid = "0" * 40
            self._answer(200, {"commitUrl": f"{base}/{route[1]}/commit/{oid}", "commitOid": oid})
        else:
            self._answer(404, {"error": f"stand-in does not know {self.path}"})

    def do_GET(self):  # noqa: N802
        self.server.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": None})
        self._answer(404, {"error": f"stand-in does not know {self.path}"})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubStandIn)
    server.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopper = threading.Timer(600, server.shutdown)  # stops itself even if teardown never runs
    stopper.daemon = True
    stopper.start()
    server.url = f"http://127.0.0.1:{server.server_port}"
    yield server
    stopper.cancel()
    server.shutdown()
    server.server_close()


def hub_env(hub) -> dict:
    # huggingface_hub reads these at import, hence subprocesses; offline mode (conftest, CI) is lifted.
    return dict(
        os.environ,
        HF_ENDPOINT=hub.url,
        HF_TOKEN=HF_SENTINEL,
        WANDB_API_KEY=WANDB_SENTINEL,
        HF_HUB_OFFLINE="0",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HF_HUB_DISABLE_TELEMETRY="1",
    )


def commits(calls: list, repo: str) -> list[dict]:
    """{path: content bytes} per commit to `repo`, from the recorded ndjson payloads."""
    import base64

    out = []
    for call in calls:
        if call["path"].startswith(f"/api/models/{repo}/commit/"):
            items = call["body"] if isinstance(call["body"], list) else [call["body"]]
            out.append(
                {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in items if i["key"] == "file"}
            )
    return out


def assert_no_secret(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert HF_SENTINEL.encode() not in data and WANDB_SENTINEL.encode() not in data, path


@pytest.fixture(scope="module")
def trained(hub, tiny_dir, tmp_path_factory):
    """A 2-step tiny SFT adapter whose recipe says hub.push: true (against the stand-in)."""
    out = tmp_path_factory.mktemp("export") / "adapter"
    cmd = [
        sys.executable,
        "-m",
        "mixtral_ft.cli",
        "train",
        str(TINY),
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.save_steps=2",
        "hub.push=true",
        "hub.repo_id=org/tiny-sft",
    ]
    proc = subprocess.run(cmd, env=hub_env(hub), capture_output=True, text=True, timeout=300)
    calls = list(hub.calls)
    assert (out / "adapter_model.safetensors").is_file(), proc.stderr[-3000:]
    return out, proc, calls


@pytest.fixture(scope="module")
def adapter(trained):
    return trained[0]


@pytest.fixture(scope="module")
def merged(adapter, tiny_fused_dir, tmp_path_factory):
    """Merged folders: dequantized (bf16, with --verify), original (bf16), dequantized fp32, fused-layout fp32."""
    root = tmp_path_factory.mktemp("merged")
    runs = {
        "deq": ["--verify"],
        "orig": ["--base-weights", "original"],
        "deq32": ["--dtype", "float32"],
        "fused32": ["--dtype", "float32", "--base", str(tiny_fused_dir)],
    }
    printed = {}
    for name, extra in runs.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["merge", str(adapter), "--out", str(root / name), *extra]) == 0
        printed[name] = buffer.getvalue()
    return {name: root / name for name in runs}, printed


@pytest.fixture(scope="module")
def logits(merged, adapter, tiny_dir, tmp_path_factory):
    """Logits of each merged folder (plain transformers, fresh process) and of adapter-on-NF4-base."""
    from peft import PeftModel

    from mixtral_ft.model.load import load_model

    dirs, _ = merged
    work = tmp_path_factory.mktemp("logits")
    ids = torch.randint(3, 32000, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "ids = torch.load(sys.argv[1])\n"
        "for d in sys.argv[3:]:\n"
        "    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.save(m(ids).logits, f'{sys.argv[2]}/{d.rsplit(\"/\", 1)[-1]}.pt')\n"
        "from transformers import AutoTokenizer\n"
        "assert AutoTokenizer.from_pretrained(sys.argv[3])('Hello').input_ids[0] == 1  # <s>\n"
        "assert not [m for m in sys.modules if m.startswith('mixtral_ft')], 'mixtral_ft was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(work / "ids.pt"), str(work), *map(str, dirs.values())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        base = load_model(str(tiny_dir), compute_dtype="float32", device="cpu")
        plain = base(ids).logits
        reference = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    got = {name: torch.load(work / f"{name}.pt") for name in dirs}
    return reference, plain, got


def rel_diff(a, b) -> float:
    """Mean |a - b| relative to mean |b|."""
    return ((a - b).abs().mean() / b.abs().mean()).item()


@pytest.mark.slow
def test_dequantized_merge_is_adapter_on_nf4_base(logits):
    reference, plain, got = logits
    print({name: (rel_diff(t, reference), (t - reference).abs().max().item()) for name, t in got.items()})
    assert (got["deq32"] - reference).abs().max().item() < FP32_MAX_TOL
    assert (got["fused32"] - reference).abs().max().item() < FP32_MAX_TOL
    assert rel_diff(got["deq"], reference) < BF16_REL_TOL
    # The tolerance has teeth: merging into the original bf16 weights fails it, and so would a lost adapter.
    assert rel_diff(got["orig"], reference) > BF16_REL_TOL
    assert rel_diff(plain, reference) > BF16_REL_TOL


@pytest.mark.slow
def test_original_mode_merges_into_the_checkpoint_weights(merged, tiny_dir):
    dirs, _ = merged
    source, deq, orig = (load_file(str(d / "model.safetensors")) for d in (tiny_dir, dirs["deq"], dirs["orig"]))
    assert set(orig) == set(source) == set(deq)  # legacy per-expert names kept
    expert = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    assert torch.equal(orig[expert], source[expert])  # original: untouched
    assert not torch.equal(deq[expert], source[expert])  # dequantized: NF4 round trip
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(orig[q], source[q]) and not torch.equal(orig[q], deq[q])
    assert all(t.dtype == torch.bfloat16 for t in deq.values())
    assert json.loads((dirs["orig"] / "merge.json").read_text())["base_weights"] == "original"


@pytest.mark.slow
def test_legacy_experts_are_quantized_as_fused_layers(merged):
    from mixtral_ft.export.merge import nf4_roundtrip

    dirs, _ = merged
    legacy, fused = (load_file(str(dirs[n] / "model.safetensors")) for n in ("deq32", "fused32"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused  # fused source stays fused
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts."
        w = {k: torch.stack([legacy[f"{prefix}{e}.{k}.weight"] for e in range(4)]) for k in ("w1", "w2", "w3")}
        assert torch.equal(torch.cat([w["w1"], w["w3"]], 1), fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"])
        assert torch.equal(w["w2"], fused[f"model.layers.{layer}.mlp.experts.down_proj"])
    # Why: per-expert NF4 has other double-quant statistics than the loader's whole-layer NF4.
    stack = torch.randn(4, 128, 64).to(torch.bfloat16)
    per_expert = torch.stack([nf4_roundtrip(stack[e]) for e in range(4)])
    assert (per_expert - nf4_roundtrip(stack)).abs().max() > 1e-3


@pytest.mark.slow
def test_sharded_checkpoint_keeps_its_shards_and_experts_split_across_them(merged, adapter, tiny_dir, tmp_path):
    from safetensors.torch import save_file

    dirs, _ = merged
    source = tmp_path / "sharded"
    source.mkdir()
    state = load_file(str(tiny_dir / "model.safetensors"))
    names = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    weight_map = {key: names[i % 3] for i, key in enumerate(sorted(state))}  # every layer's experts span shards
    for name in names:
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, str(source / name))
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for extra in tiny_dir.iterdir():
        if extra.suffix != ".safetensors":
            (source / extra.name).write_bytes(extra.read_bytes())
    out = tmp_path / "out"
    assert main(["merge", str(adapter), "--out", str(out), "--base", str(source), "--dtype", "float32"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    expected = load_file(str(dirs["deq32"] / "model.safetensors"))
    for name in names:
        shard = load_file(str(out / name))
        assert set(shard) == {k for k, f in weight_map.items() if f == name}
        assert all(torch.equal(t, expected[k]) for k, t in shard.items())


@pytest.mark.slow
def test_verify_report_is_printed_written_and_in_the_card(merged):
    dirs, printed = merged
    report = json.loads((dirs["deq"] / "verify.json").read_text())
    assert report["samples"] > 0 and "eval split" in report["source"]
    assert 0 <= report["mean_abs_logit_diff"] < BF16_REL_TOL * report["mean_abs_logit"]
    assert report["perplexity_merged"] == pytest.approx(report["perplexity_adapter_on_base"], rel=1e-2)
    assert re.search(r"verify: logits \|merged - adapter-on-base\|: max \S+, mean \S+", printed["deq"])
    assert "verify: perplexity (assistant tokens): adapter-on-base" in printed["deq"]
    card = (dirs["deq"] / "README.md").read_text()
    assert "## Verification" in card and f"{report['max_abs_logit_diff']:.6g}" in card
    assert "library_name: transformers" in card and "NF4-dequantized" in card


@pytest.mark.slow
def test_training_with_hub_push_uploads_the_adapter(trained):
    adapter, proc, calls = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(c["path"].startswith("/api/") for c in calls)
    create = [c for c in calls if c["path"] == "/api/repos/create"]
    assert len(create) == 1
    assert create[0]["body"]["organization"] == "org" and create[0]["body"]["name"] == "tiny-sft"
    assert create[0]["body"]["visibility"] == "private"  # hub.private defaults to true
    assert create[0]["auth"] == f"Bearer {HF_SENTINEL}"
    [files] = commits(calls, "org/tiny-sft")
    assert {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "run.json",
        "tokenizer_config.json",
    } <= set(files)
    assert not [f for f in files if f.startswith("checkpoint-") or f == "training_args.bin"]
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "- mixtral\n- qlora\n- mixtral-ft" in card and "OpenAssistant/oasst_top1_2023-08-25" in card
    assert_no_secret(adapter)


@pytest.mark.slow
def test_push_merged_model_through_the_cli(hub, merged):
    dirs, _ = merged
    before = len(hub.calls)
    cmd = [sys.executable, "-m", "mixtral_ft.cli", "push", str(dirs["orig"]), "--repo-id", "org/merged", "--no-private"]
    proc = subprocess.run(cmd, env=hub_env(hub), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = hub.calls[before:]
    create = [c["body"] for c in calls if c["path"] == "/api/repos/create"]
    assert create == [{"name": "merged", "organization": "org", "visibility": "public", "type": "model"}]
    [files] = commits(calls, "org/merged")
    assert {"README.md", "config.json", "model.safetensors", "merge.json", "tokenizer.model.v1"} <= set(files)
    assert "library_name: transformers" in files["README.md"].decode()
    assert_no_secret(dirs["orig"])


def test_dry_run_lists_files_and_needs_no_token(adapter, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = {p: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    assert main(["push", str(adapter), "--repo-id", "org/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing uploaded" in out and "(private)" in out
    assert re.search(r"adapter_model\.safetensors\s+\d+\.\d KiB", out)
    assert "README.md" in out and "checkpoint-" not in out and "training_args.bin" not in out
    assert {p: p.read_bytes() for p in adapter.iterdir() if p.is_file()} == before  # nothing written


def test_secrets_are_scrubbed_from_the_card_and_block_the_push(adapter, tmp_path, monkeypatch, capsys):
    from mixtral_ft.train.card import render_card

    monkeypatch.setenv("HF_TOKEN", HF_SENTINEL)
    folder = tmp_path / "leaky"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((adapter / name).read_bytes())
    recipe = (adapter / "recipe.yaml").read_text().replace("max_rows: null", f"max_rows: null  # {HF_SENTINEL}")
    (folder / "recipe.yaml").write_text(recipe.replace("builtin:oasst_top1", f"https://x.test/?t={HF_SENTINEL}"))
    card = render_card(folder, "adapter", "org/x")
    assert HF_SENTINEL not in card and "?t=***" in card
    assert main(["push", str(folder), "--repo-id", "org/x", "--dry-run"]) == 2
    assert "contains the value of HF_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case",
    [
        "bad_repo",
        "no_namespace",
        "not_a_folder_kind",
        "missing_dir",
        "no_token",
        "merge_out_exists",
        "merge_missing_adapter",
        "merge_model_not_adapter",
        "recipe_push_without_repo",
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, adapter, tiny_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    argv, expect = {
        "bad_repo": (["push", str(adapter), "--repo-id", "not a repo!"], "bad repo id"),
        "no_namespace": (["push", str(adapter), "--repo-id", "just-a-name"], "bad repo id"),
        "not_a_folder_kind": (["push", str(junk), "--repo-id", "org/x"], "not an adapter or model folder"),
        "missing_dir": (["push", str(tmp_path / "nope"), "--repo-id", "org/x"], "does not exist"),
        "no_token": (["push", str(adapter), "--repo-id", "org/x"], "huggingface-cli login"),
        "merge_out_exists": (["merge", str(adapter), "--out", str(junk)], "already exists"),
        "merge_missing_adapter": (["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not found"),
        "merge_model_not_adapter": (["merge", str(tiny_dir), "--out", str(tmp_path / "o")], "adapter_config.json"),
        "recipe_push_without_repo": (["validate", str(TINY), "--set", "hub.push=true"], "hub.repo_id"),
    }[case]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = (adapter / "README.md").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and expect in err, err
    assert "Traceback" not in err
    assert (adapter / "README.md").read_bytes() == before  # a refused push writes nothing
    assert not (tmp_path / "o").exists()
