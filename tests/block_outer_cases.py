"""Random CSR batches, block layouts and the dense oracle shared by the
block_outer and metric tests (also used by tests/gpu)."""
import numpy as np

from gradnet_cupy.kernels import CSR, Blocks


def random_csr(rng, rows, columns, density, empty_rows=()):
    """A float32 CSR (NumPy) with about ``density`` of its entries nonzero;
    rows listed in ``empty_rows`` have none. Returns (csr, dense float64)."""
    dense = rng.standard_normal((rows, columns)).astype(np.float32)
    dense[rng.random((rows, columns)) >= density] = 0
    dense[list(empty_rows)] = 0
    return csr_from_dense(dense), dense.astype(np.float64)


def csr_from_dense(dense):
    """CSR of the nonzeros of a 2-D NumPy array (data cast to float32)."""
    row, column = np.nonzero(dense)
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=dense.shape[0]), out=indptr[1:])
    return CSR(indptr, column.astype(np.int32),
               dense[row, column].astype(np.float32), dense.shape)


def gappy_blocks(columns):
    """Blocks with sizes 1, 2, 3, 17, 40 and the rest, some columns left out
    between and after them."""
    starts = [0, 1, 5, 8, 30, 75]
    sizes = [1, 2, 3, 17, 40, columns - 75 - 4]
    return Blocks(starts, sizes, columns)


def oracle(dense, blocks, weights=None):
    """Packed float64 blocks of ``dense^T diag(weights) dense`` (the full
    Gram matrix, restricted to the diagonal blocks)."""
    w = np.ones(len(dense)) if weights is None else weights.astype(np.float64)
    full = dense.T @ (dense * w[:, None])
    return np.concatenate([
        full[s:s + n, s:s + n].ravel()
        for s, n in zip(blocks.starts, blocks.sizes)])


def abs_oracle(dense, blocks, weights=None):
    """The oracle of ``|dense|`` and ``|weights|``: the scale of the sums
    that bounds their rounding."""
    return oracle(np.abs(dense), blocks,
                  None if weights is None else np.abs(weights))
