"""The one exception type for bad input.

Every check of user input (shapes, ranges, files, names) raises
:class:`GradnetError` with a message naming the problem; the command line
prints it as one line and exits non-zero instead of showing a traceback.
"""


class GradnetError(ValueError):
    """Bad input: a wrong shape, value, file or name. The message says which."""
