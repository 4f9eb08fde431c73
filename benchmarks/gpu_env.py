"""What the GPU box runs (benchmarks/gpu_truth.py, stage `env`): the GPU, driver, versions, and whether each package
`mixtral-ft train` needs imports (the image lacks some; benchmarks/gpu_prepare.sh carries them as wheels).

    python benchmarks/gpu_env.py --out env.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

MODULES = (
    "torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "mistral_common", "safetensors",
    "huggingface_hub", "tokenizers", "pyarrow", "pydantic", "yaml", "liger_kernel", "triton", "pytest",
    "transformers.tokenization_mistral_common",  # the tokenizer backend: mistral_common's request, jsonschema, attrs
)  # fmt: skip


def module_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # a broken import is the finding, whatever it raises
        return f"missing: {type(exc).__name__}: {exc}"[:300]
    return str(getattr(module, "__version__", "?")) + f" ({Path(module.__file__).parent.parent})"


def gpu() -> dict:
    import torch

    found = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found |= {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
        }
    else:  # what train's one-line error would say here
        try:
            from mixtral_ft.common import why_no_cuda

            found["why_no_cuda"] = why_no_cuda()
        except Exception as exc:  # this stage reports; it must not fail
            found["why_no_cuda"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    try:  # the file why_no_cuda reads the driver version from, to check its format on a real machine
        found["driver_file"] = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError) as exc:
        found["driver_file"] = f"unavailable: {type(exc).__name__}"
    try:
        query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
        found["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        found["nvidia_smi"] = f"unavailable: {exc}"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = {"python": sys.version.split()[0], "platform": platform.platform(), "gpu": gpu()}
    report["modules"] = {name: module_version(name) for name in MODULES}
    report["missing"] = [name for name, v in report["modules"].items() if v.startswith("missing")]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
