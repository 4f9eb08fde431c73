"""Run in a subprocess by test_quant: load a checkpoint, print peak RSS growth and the final footprint."""

import json
import sys
from pathlib import Path

import bitsandbytes  # noqa: F401  (import cost stays out of the measurement)
import torch
import transformers.models.mixtral.modeling_mixtral  # noqa: F401

from mixtral_ft.model.audit import audit_model
from mixtral_ft.model.load import load_model

torch.zeros(1)
before = int(Path("/proc/self/statm").read_text().split()[1]) * 4096
model = load_model(sys.argv[1], device="cpu", compute_dtype="float32")
# VmHWM, not ru_maxrss: the latter survives exec and would include the forking parent's pages.
peak = next(
    int(line.split()[1]) * 1024
    for line in Path("/proc/self/status").read_text().splitlines()
    if line.startswith("VmHWM")
)
final = sum(row.storage_bytes for row in audit_model(model).rows)
print(json.dumps({"peak_growth": peak - before, "final": final}))
