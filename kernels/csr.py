"""The CSR batch that flows from the sparsify kernel to the store and GradNet."""
from typing import NamedTuple, Tuple

import numpy as np


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

        from gradnet_cupy.backend import to_numpy
        return scipy.sparse.csr_matrix(
            (to_numpy(self.data), to_numpy(self.indices),
             to_numpy(self.indptr)), shape=self.shape)

    def to_device(self, device):
        """The same CSR with its arrays on ``device`` ('cpu' or 'gpu')."""
        from gradnet_cupy.backend import to_device
        return CSR(to_device(self.indptr, device),
                   to_device(self.indices, device),
                   to_device(self.data, device), self.shape)


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
