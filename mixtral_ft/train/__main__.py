"""`python -m mixtral_ft.train RECIPE [key=value ...]`: the entry point accelerate and torchrun launch."""

import sys

from mixtral_ft.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
