"""QLoRA throughput of full-width Mixtral-8x7B in NF4 (random weights, no checkpoint on disk).

    python benchmarks/throughput.py --layers 32 --batch 2 8      # on a GPU, writes results/<date>-<device>.json
    python benchmarks/throughput.py --device cpu --tiny          # smoke run (CI)

Same as `mixtral-ft bench`; the implementation lives in mixtral_ft/bench.py.
"""

import sys

from mixtral_ft.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
