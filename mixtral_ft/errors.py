"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (recipe, data, paths, flags). The message names the problem and the fix."""
