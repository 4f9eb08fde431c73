"""The peers benchmarks/compare.py measures beside our NF4 experts, in the same run and through the same harness
(`mixtral_ft.bench.steps`). They live outside the package: it never imports them.

- `v4`: transformers 4.57 with every expert an NF4 `Linear4bit` (the legacy `load_in_4bit`), at full
  depth. It needs transformers 4, so it runs as a subprocess (`python benchmarks/peer_v4.py`) with a side
  folder of packages first on the path; without one it is skipped and the result says so.
- `v5`: today's stock path, transformers 5 `from_pretrained(..., load_in_4bit)` of a random bf16
  checkpoint. Its experts stay bf16 (2.6 GiB a layer), so it runs at reduced depth beside our model at that
  same depth, and the result gives what its weights alone would need at full depth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mixtral_ft.bench import steps

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the checkout: where the subprocess finds mixtral_ft when it is not installed
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_local_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "initializer_range",
)
V4_NAME = "transformers-4.57 Linear4bit experts"
V5_NAME = "transformers-5 load_in_4bit (bf16 experts)"


def shape_of(config) -> dict:
    """The config fields both transformers majors read the same way (v5 keeps rope_theta under rope_parameters)."""
    shape = {key: getattr(config, key, None) for key in SHAPE_KEYS}
    if shape["rope_theta"] is None:
        shape["rope_theta"] = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 1e6)
    return shape


def run_v4(
    site: Path, config, *, batch: int, seq: int, steps_: int, warmup: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """The v4 peer in a subprocess with `site` (holding transformers 4.57) ahead of our environment."""
    command = [
        sys.executable,
        str(HERE / "peer_v4.py"),
        "--shape",
        json.dumps(shape_of(config)),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(steps_),
        "--warmup",
        str(warmup),
        "--device",
        str(device),
        "--dtype",
        str(dtype).removeprefix("torch."),
    ]
    # A script's own folder (benchmarks/) comes first on its path, then these: the side folder's transformers 4.57
    # shadows ours, and the checkout gives mixtral_ft.bench.steps.
    path = [str(site), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": V4_NAME, "error": f"exit {done.returncode}: {last}"}
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if not result["transformers"].startswith("4."):
        return {"name": V4_NAME, "error": f"{site} gives transformers {result['transformers']}, not 4.x"}
    return {"name": V4_NAME} | result


def run_stock_v5(
    config,
    *,
    batch: int,
    seq: int,
    steps_: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    full_depth: int,
    folder: Path,
) -> dict:
    """Stock transformers 5: a random bf16 checkpoint of `config` in `folder` (written once, then reused for each
    batch), loaded with `load_in_4bit` and timed."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MixtralForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    # grouped_mm is the fastest stock expert kernel on a GPU (../shared/bench: 29 vs 37 ms a layer).
    experts = "grouped_mm" if device.type == "cuda" else "eager"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device(device):
            MixtralForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    steps.reset_peak(device)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, dtype=dtype, device_map=str(device), experts_implementation=experts
    )
    build_s = time.perf_counter() - started
    groups = steps.weight_gib_by_group(model)
    layers = config.num_hidden_layers
    steps.enable_checkpointing(model)
    model = steps.add_lora(model)
    result = steps.time_qlora_steps(
        model, batch=batch, seq=seq, vocab_size=config.vocab_size, steps=steps_, warmup=warmup, device=device
    )
    per_layer = (groups["experts"] + groups["attention"]) / layers
    return {
        "name": V5_NAME,
        "layers": layers,
        "batch": batch,
        "seq": seq,
        "experts_implementation": experts,
        "build_s": round(build_s, 2),
        "weights_gib": groups,
        "expert_gib_per_layer": round(groups["experts"] / layers, 3),
        "weights_gib_at_full_depth": round(groups["other"] + per_layer * full_depth, 2),
    } | result
