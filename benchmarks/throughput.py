"""QLoRA throughput of full-width Mixtral-8x7B in NF4, ours only (random weights, no checkpoint on disk).

    python benchmarks/throughput.py --layers 32 --batch 2 8 --out-dir DIR   # on a GPU
    python benchmarks/throughput.py --device cpu --tiny                      # smoke run (CI)

Same as `mixtral-ft bench` (mixtral_ft/bench/throughput.py): the result file goes to --out-dir, by default
./bench-results of the current folder. To measure the peers in the same run, use benchmarks/compare.py.
"""

import sys

from mixtral_ft.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
