"""Crash-safe file writes: a file appears under its final name complete or
not at all.

Neighbours: :mod:`gradnet_cupy.errors` (``naming``: an OSError names the
path); used by every module that writes a final file (train_base's
snapshots, normalizers, GradNet folders, geodesic checkpoints, edges and
RBM outputs). The tangent store has its own two-phase journal
(:mod:`gradnet_cupy.store.format`).
"""
import os
import secrets

from gradnet_cupy.errors import naming


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file next to ``path``, then
    rename it to ``path``; on any error the temporary file is removed (an
    OSError that names no file names ``path``)."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{name}.{secrets.token_hex(6)}.tmp')
    f = open(tmp, 'xb')
    try:
        with naming(path), f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
