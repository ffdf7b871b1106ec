"""The CSR batch that flows from the sparsify kernel to the store and GradNet.

:class:`CSR` is the batch type; :func:`check_csr` is the one validation of a
CSR batch (the kernels here, the store and the metric call it before they
trust one); :func:`vstack` stacks row batches. Neighbours: ``sparsify.py``
produces CSR batches, ``block_outer.py`` consumes them, and
``gradnet_cupy.backend`` moves their arrays between host and GPU.
"""
from typing import NamedTuple, Tuple

import numpy as np

from gradnet_cupy.backend import get_array_module, to_device, to_numpy
from gradnet_cupy.errors import GradnetError


class CSR(NamedTuple):
    """A CSR matrix on one device (all arrays NumPy, or all CuPy).

    ``indptr``: int64 (rows + 1,); ``indices``: int32 (nnz,), sorted ascending
    within each row; ``data``: float32 (nnz,); ``shape``: (rows, n_columns).
    """
    indptr: object
    indices: object
    data: object
    shape: Tuple[int, int]

    @property
    def nnz(self):
        return int(self.indices.shape[0])

    def to_scipy(self):
        """A ``scipy.sparse.csr_matrix`` on the host (copies from the GPU)."""
        import scipy.sparse

        return scipy.sparse.csr_matrix(
            (to_numpy(self.data), to_numpy(self.indices),
             to_numpy(self.indptr)), shape=self.shape)

    def to_device(self, device):
        """The same CSR with its arrays on ``device`` ('cpu' or 'gpu')."""
        return CSR(to_device(self.indptr, device),
                   to_device(self.indices, device),
                   to_device(self.data, device), self.shape)


def check_csr(csr, n_columns=None, contents=True):
    """Raises :class:`GradnetError` unless ``csr`` is a well-formed
    :class:`CSR` with ``n_columns`` columns (any number when None). Returns
    its array module (numpy or cupy).

    The layout (type, shapes, the dtypes of the CSR docstring) is checked on
    the host. With ``contents`` (the default) also the arrays' contents:
    ``indptr`` rising from 0 to nnz, column indices in range and strictly
    increasing within each row. On CuPy arrays those checks are reductions
    queued on the current stream (enter ``with stream:`` first) and one
    host read of their three flags, the only host wait of this function.
    """
    if not isinstance(csr, CSR):
        raise GradnetError(f'expected a CSR batch, got {type(csr).__name__}')
    xp = get_array_module(csr.indptr, csr.indices, csr.data)
    rows, columns = csr.shape
    if n_columns is not None and columns != n_columns:
        raise GradnetError(
            f'the CSR batch has {columns} columns but the blocks are over '
            f'{n_columns} columns')
    if csr.indptr.shape != (rows + 1,) or csr.data.shape != csr.indices.shape:
        raise GradnetError(
            f'malformed CSR: indptr {csr.indptr.shape} for {rows} rows, '
            f'indices {csr.indices.shape}, data {csr.data.shape}')
    for name, dtype in (('indptr', np.int64), ('indices', np.int32),
                        ('data', np.float32)):
        if getattr(csr, name).dtype != dtype:
            raise GradnetError(f'CSR {name} must be {np.dtype(dtype).name}, '
                               f'got {getattr(csr, name).dtype}')
    if not contents:
        return xp
    indptr, indices, nnz = csr.indptr, csr.indices, csr.nnz
    # a row starts at each position indptr[1:-1] (clipped: a bad indptr is
    # reported by the first flags); index 0 and nnz are a row start anyway
    row_start = xp.zeros(nnz + 1, dtype=bool)
    row_start[xp.clip(indptr[1:-1], 0, nnz)] = True
    rising = xp.diff(indices.astype(np.int64)) > 0
    flags = xp.stack([
        (indptr[0] != 0) | (indptr[-1] != nnz) | (xp.diff(indptr) < 0).any(),
        ((indices < 0) | (indices >= columns)).any(),
        ~(rising | row_start[1:-1]).all()])
    bad_indptr, out_of_range, unsorted = to_numpy(flags).tolist()
    if bad_indptr:
        raise GradnetError('malformed CSR: indptr must rise from 0 to nnz')
    if out_of_range:
        raise GradnetError(
            f'CSR column indices out of range [0, {columns})')
    if unsorted:
        raise GradnetError(
            'CSR column indices must be strictly increasing within each row')
    return xp


def vstack(parts, n_columns, xp):
    """Stack CSR row batches of ``n_columns`` columns, all in array module
    ``xp``, into one CSR, rows in order (an empty list gives 0 rows)."""
    if any(p.shape[1] != n_columns for p in parts):
        raise ValueError(f'vstack needs CSR parts of {n_columns} columns')
    if not parts:
        return CSR(xp.zeros(1, dtype=np.int64), xp.zeros(0, dtype=np.int32),
                   xp.zeros(0, dtype=np.float32), (0, n_columns))
    shifts = np.cumsum([0] + [p.nnz for p in parts[:-1]])
    indptr = xp.concatenate([parts[0].indptr[:1]] + [
        p.indptr[1:] + int(shift) for p, shift in zip(parts, shifts)])
    return CSR(indptr, xp.concatenate([p.indices for p in parts]),
               xp.concatenate([p.data for p in parts]),
               (sum(p.shape[0] for p in parts), n_columns))
