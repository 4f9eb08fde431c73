"""Fixtures of the export tests: one tiny training run with `hub.push: true` against a local HTTP stand-in for
the Hub (which records what huggingface_hub sends), and the folders merged from its adapter. Package-scoped,
so the merge and push tests share one training run.
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

from mixtral_ft.cli import main

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
HF_SENTINEL = "hf_sentinelTOKEN0123456789abcdef"
WANDB_SENTINEL = "wandbsentinel0123456789abcdef0123456789"


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


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def adapter(trained):
    return trained[0]


@pytest.fixture(scope="package")
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
