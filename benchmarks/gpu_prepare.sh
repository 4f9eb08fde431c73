#!/usr/bin/env bash
# Run HERE (not on the GPU box) before a GPU session: fetches the wheels the GPU image lacks into .whl/
# (git-ignored), for Python 3.12 / x86-64, within the device's 64 MiB carry limit. Versions follow
# requirements/lock.txt, so the GPU measures the stack CI tests.
#   .whl/main: bitsandbytes (trimmed to the CUDA 13.0 library the image's torch 2.11+cu130 loads), liger-kernel,
#              our transformers/peft (the image has older ones), and what `mixtral-ft train` needs beyond the
#              image: trl, datasets, mistral-common (the tokenizer) and their pure-Python needs
#   .whl/v4:   transformers 4.57.6 and the hub/tokenizers it accepts: the legacy peer's side environment
# Then `bash benchmarks/gpu_rehearse.sh` here (the same run on the image's versions), and with the device tool:
# run(command="bash benchmarks/gpu_truth.sh", carry=[".whl"], timeout_s=570)
# (benchmarks/NOTES.md, "Running it on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
lock() {  # the lock file's pin of each name: NAME==VERSION
  local name
  for name in "$@"; do grep -i "^${name}==" requirements/lock.txt || { echo "not in the lock: $name" >&2; exit 2; }; done
}
fetch() {  # fetch DIR PACKAGE==VERSION...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}
rm -rf .whl && mkdir -p .whl/main .whl/v4
fetch .whl/main liger-kernel==0.8.5 $(lock bitsandbytes transformers peft trl datasets dill multiprocess \
  mistral-common pydantic pydantic-core pydantic-extra-types annotated-types typing-inspection typing-extensions \
  pycountry jsonschema jsonschema-specifications referencing rpds-py regex)
fetch .whl/v4 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.1
# bitsandbytes ships one library per CUDA version (129 MB); the image's torch is cu130.
zip -q -d .whl/main/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda11*' 'bitsandbytes/libbitsandbytes_cuda12*' \
  'bitsandbytes/libbitsandbytes_cuda132.so' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
du -sh .whl/main .whl/v4 .whl
