"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""

import argparse


class UserError(Exception):
    """A problem the user can fix (recipe, data, paths, flags). The message names the problem and the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: it would print its usage too, and a bad flag is one line like all input."""

    def error(self, message):
        raise UserError(f"{message}: see `{self.prog} --help`")
