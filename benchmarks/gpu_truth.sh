#!/usr/bin/env bash
# Run ON the GPU box, with the device tool, after benchmarks/gpu_prepare.sh here:
#   run(command="bash benchmarks/gpu_truth.sh", carry=[".whl"], timeout_s=570)
# Installs the carried wheels beside the image's torch (once per machine: a second call on the warm machine
# skips it), then runs benchmarks/gpu_truth.py: every stage of issue 18 that fits in --budget (default 500 s),
# results into $OUT as each stage ends. Arguments go to gpu_truth.py (--budget, --only, --redo, --list).
# A second call on the same warm machine goes on where the first stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/main/*.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/v4site .whl/v4/*.whl
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
export MIXTRAL_FT_CACHE=/tmp/mixtral-ft-cache
exec python3 benchmarks/gpu_truth.py --peer-v4-site /tmp/v4site "$@"
