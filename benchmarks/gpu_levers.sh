#!/usr/bin/env bash
# Run ON the GPU box after gpu_run.sh's install (same call or a later one: carry=[".whl"]): each speed lever of
# benchmarks/NOTES.md alone at 32 layers, B2 x S2048, ours only (`mixtral-ft bench`: no peers), one result
# file per lever (tag = the lever).
# Arguments replace the default batch list, e.g. `bash benchmarks/gpu_levers.sh --batch 8`.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import bitsandbytes" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/main/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/bench-results}  # copy the JSON files into benchmarks/results/ by hand
mkdir -p "$out"
batch=("${@:---batch 2}")
for lever in "" "--experts loop" "--reuse-dequantized" "--skip-checkpoint-layers 2" "--compile" "--liger" \
             "--lora-dropout 0.05" "--reuse-dequantized --compile"; do
  tag=$(echo "${lever:-default}" | tr -d '-' | tr ' ' '_')
  # shellcheck disable=SC2086
  python3 -m mixtral_ft.bench --layers 32 ${batch[*]} $lever --tag "lever-$tag" \
    --out-dir "$out" 2>&1 | tee -a "$out/levers.log" | grep -v Warning
done
