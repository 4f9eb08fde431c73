"""`python -m mixtral_ft.bench ...`: the same as `mixtral-ft bench ...`."""

import sys

from mixtral_ft.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
