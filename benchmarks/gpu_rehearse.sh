#!/usr/bin/env bash
# Run HERE (CPU) before a GPU session, after benchmarks/gpu_prepare.sh: rebuilds the GPU image's Python stack in a
# venv and runs what the device will run, so what the image's versions break is found here, not in device minutes.
# The image's torch (2.11), huggingface_hub, tokenizers and numpy differ from our lock; only the carried wheels
# (.whl/) follow it. This venv holds the image's versions (IMAGE below, from the device tool's KINDS.md pip list,
# 2026-11: keep it in step), the lock's for the rest, and the carried wheels installed as gpu_truth.sh installs them.
#   bash benchmarks/gpu_rehearse.sh           # gpu_truth.py --dry-run, v4 peer included (~3 min; first run
#                                             # installs torch 2.11's CUDA build: ~5 GB of venv)
#   bash benchmarks/gpu_rehearse.sh --tests   # and then the CPU test suite on that stack (~10 min)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=(torch==2.11.0 accelerate==1.15.0 huggingface-hub==1.33.0 safetensors==0.8.0 tokenizers==0.23.2
  numpy==2.5.2 sentencepiece==0.2.2 tiktoken==0.14.0)
# Every other package of the image that the lock holds too (KINDS.md lists names only: the lock's versions stand in)
IMAGE_ALSO=(absl-py annotated-doc anyio attrs certifi charset-normalizer click contourpy cycler filelock fonttools
  fsspec grpcio h11 hf-xet httpcore httpx idna iniconfig jinja2 kiwisolver markdown markdown-it-py markupsafe
  matplotlib mdurl mpmath networkx packaging pandas pillow pluggy protobuf psutil pyarrow pygments pyparsing pytest
  python-dateutil pyyaml requests rich shellingham sympy tensorboard tensorboard-data-server tqdm typer urllib3
  werkzeug xxhash)
# The suite's extras that the image lacks; --tests puts them on a side path, so the venv stays the image.
TEST_ONLY=(wandb gradio playwright nbclient nbformat ipykernel)
DIR=${MIXTRAL_FT_REHEARSE:-/tmp/mixtral-ft-rehearse}
python312() {  # the image's Python: $PYTHON312, python3.12 on PATH, or pyenv's
  local candidate
  for candidate in "${PYTHON312:-}" python3.12 "$(pyenv root 2> /dev/null)"/versions/3.12*/bin/python3.12; do
    [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2> /dev/null &&
      { echo "$candidate"; return; }
  done
  return 1
}
[ -d .whl/main ] && [ -d .whl/v4 ] || { echo "no .whl/: run bash benchmarks/gpu_prepare.sh first" >&2; exit 2; }
PYTHON=$(python312) || { echo "no Python 3.12 (the image's): set PYTHON312=/path/to/python3.12" >&2; exit 2; }
pip() { "$DIR/venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
# rebuilt whenever what it is built from changes: the lists above, the lock, the carried wheels
stamp=$( (printf '%s\n' "${IMAGE[@]}" "${IMAGE_ALSO[@]}" "${TEST_ONLY[@]}"; cat requirements/lock.txt; ls .whl/*) | sha1sum)
if [ "$(cat "$DIR/.built" 2> /dev/null)" != "$stamp" ]; then
  rm -rf "$DIR" && "$PYTHON" -m venv "$DIR/venv"
  # the image's pins (and torch's own triton and setuptools caps) replace the lock's lines for those names
  pinned=$(printf '%s\n' "${IMAGE[@]%%==*}" triton setuptools | paste -sd '|')
  grep -viE "^($pinned)==" requirements/lock.txt > "$DIR/constraints.txt"
  printf '%s\n' "${IMAGE[@]}" >> "$DIR/constraints.txt"
  pip install -c "$DIR/constraints.txt" "${IMAGE[@]}" "${IMAGE_ALSO[@]}"
  pip install --no-deps .whl/main/*.whl  # as gpu_truth.sh: --no-deps, so the wheels' own pins are not enforced
  pip install --no-deps --target "$DIR/v4site" .whl/v4/*.whl
  echo "$stamp" > "$DIR/.built"
fi
export PATH="$DIR/venv/bin:$PATH" PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# its own compile cache, emptied each time: a killed run's half-written kernel broke the next run ("main.so: file
# too short"), and torch 2.11's kernels stay apart from the lock's torch's
export WANDB_MODE=offline MIXTRAL_FT_CACHE="$DIR/cache" TORCHINDUCTOR_CACHE_DIR="$DIR/inductor"
python -c 'import torch, transformers; print("rehearsing on torch", torch.__version__, "transformers", transformers.__version__)'
rm -rf "$DIR/work" "$DIR/out" "$DIR/inductor"
python benchmarks/gpu_truth.py --dry-run --budget 3000 --peer-v4-site "$DIR/v4site" --work "$DIR/work" --out "$DIR/out"
python - "$DIR/work" << 'EOF'  # on the device a failed stage lets the next one run; here it is the finding
import json, sys
work = sys.argv[1]
stages = json.load(open(f"{work}/gpu-truth.json"))["stages"]
failed = [name for name, stage in stages.items() if stage["status"] != "ok"]
failed += [f"env: {name} does not import" for name in json.load(open(f"{work}/env.json"))["missing"]]
print(f"rehearsal: failed: {'; '.join(failed)} (logs in {work})" if failed else "rehearsal: every stage ran")
sys.exit(1 if failed else 0)
EOF
if [ "${1:-}" = --tests ]; then
  if [ ! -d "$DIR/testsite" ]; then
    pip install -c "$DIR/constraints.txt" --target "$DIR/testsite.part" "${TEST_ONLY[@]}"
    mv "$DIR/testsite.part" "$DIR/testsite"
  fi
  PYTHONPATH="$PWD:$DIR/testsite" python -m pytest -q -p no:cacheprovider -m "not gpu"
fi
