"""The one exception type for bad input.

Every check of user input (shapes, ranges, files, names) raises
:class:`GradnetError` with a message naming the problem; the command line
prints it as one line and exits non-zero instead of showing a traceback.
Operating-system errors stay OSErrors; :func:`naming` makes sure they name
the file they concern, so that the command line can print them as one line
too.
"""
import contextlib


class GradnetError(ValueError):
    """Bad input: a wrong shape, value, file or name. The message says which."""


@contextlib.contextmanager
def naming(path):
    """Re-raise an OSError that does not name its file (a failed write:
    disk full, file too large, an HDF5 error) as one naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
