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


def vstack(parts):
    """Stack CSR matrices of equal column count (one array module) into one
    CSR, rows in order."""
    from gradnet_cupy.backend import get_array_module
    xp = get_array_module(parts[0].data)
    n_columns = parts[0].shape[1]
    if any(p.shape[1] != n_columns for p in parts):
        raise ValueError('vstack needs CSR parts with equal column counts')
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + p.nnz)
    indptr = xp.concatenate([parts[0].indptr[:1]] + [
        p.indptr[1:] + offset for p, offset in zip(parts, offsets)])
    return CSR(indptr, xp.concatenate([p.indices for p in parts]),
               xp.concatenate([p.data for p in parts]),
               (sum(p.shape[0] for p in parts), n_columns))
