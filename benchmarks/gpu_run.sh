#!/usr/bin/env bash
# Run ON the GPU box (device tool, carry=[".whl"] from benchmarks/gpu_prepare.sh): installs the carried wheels
# beside the image's torch/transformers/peft, then runs benchmarks/compare.py at 32 layers: ours and both peers
# in the same invocation (the v4 peer at full depth in its side folder, stock transformers 5 at 2 layers).
# Extra arguments go to compare.py, which takes every `mixtral-ft bench` option (e.g. --batch 2 8 --profile,
# or a lever: --reuse-dequantized --tag reuse). Results land in $OUT (else /tmp/bench-results); copy the JSON
# files into benchmarks/results/ by hand and commit them. CPU dry run: bash benchmarks/gpu_run.sh --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/main/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/v4site .whl/v4/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
out=${OUT:-/tmp/bench-results}
mkdir -p "$out"
python3 benchmarks/compare.py --layers 32 --peer-v4-site /tmp/v4site --out-dir "$out" "$@" 2>&1 | tee -a "$out/bench.log"
