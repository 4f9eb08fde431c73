#!/usr/bin/env bash
# Run HERE (not on the GPU box) before a GPU session: fetches the wheels the GPU image lacks into .whl/
# (git-ignored), for Python 3.12 / x86-64, within the device's 64 MiB carry limit.
#   .whl/main: bitsandbytes (trimmed to the CUDA 13.0 library the image's torch 2.11+cu130 loads), liger-kernel
#   .whl/v4:   transformers 4.57.6 and the hub/tokenizers it accepts: the legacy peer's side environment
# Then, with the device tool (ours and both peers through benchmarks/compare.py): run(command="bash benchmarks/gpu_run.sh --batch 2 8 --profile", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
fetch() {  # fetch DIR PACKAGE==VERSION...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}
rm -rf .whl && mkdir -p .whl/main .whl/v4
fetch .whl/main bitsandbytes==0.50.2 liger-kernel==0.8.5
fetch .whl/v4 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.1
# bitsandbytes ships one library per CUDA version (129 MB); the image's torch is cu130.
zip -q -d .whl/main/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda11*' 'bitsandbytes/libbitsandbytes_cuda12*' \
  'bitsandbytes/libbitsandbytes_cuda132.so' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
du -sh .whl/main .whl/v4
