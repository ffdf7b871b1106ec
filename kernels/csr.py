"""The CSR batch that flows from the sparsify kernel to the store and GradNet."""
from typing import NamedTuple, Tuple


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
