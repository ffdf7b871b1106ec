"""Random CSR batches, block layouts and the dense oracle shared by the
block_outer and metric tests (also used by tests/gpu), and the named cases
that test_block_outer.py runs on every tier."""
import functools

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


def tile_blocks():
    """Blocks of 1, 2 and 3 columns, one of two tiles per side (a partial
    off-diagonal tile) and one of three; columns 3, 4, 38 and 110.. in none
    (112 columns)."""
    return Blocks([0, 1, 5, 39, 105], [1, 2, 33, 66, 3], 112)


def mixed_blocks(columns):
    """Sizes 1, 2, 31, 33, 100, 1000 (several tiles) and the rest, with
    gaps."""
    starts = [0, 2, 10, 41, 80, 200, 1300]
    sizes = [1, 2, 31, 33, 100, 1000, columns - 1300 - 7]
    return Blocks(starts, sizes, columns)


def symmetric_blocks(rng, blocks):
    """Packed random symmetric blocks (float64)."""
    parts = []
    for size in blocks.sizes:
        a = rng.standard_normal((size, size))
        parts.append((a + a.T).ravel())
    return np.concatenate(parts)


@functools.lru_cache(maxsize=None)
def block_case(name):
    """``(csr, dense, blocks, start)`` of a named case: a NumPy CSR batch,
    its dense float64 rows, the Blocks and the float64 packed blocks to
    start from (built once; do not modify them).

    ``gappy``: 60 x 130, empty rows, a row with entries outside the blocks
    only, blocks of size 1 and 2, columns in no block; starts at zero.
    ``tiles``: 19 x 112 over :func:`tile_blocks`, a row with nothing in a
    two-tile block, a row with entries outside the blocks only; starts from
    random symmetric blocks. ``mixed``: 300 x 3000 over :func:`mixed_blocks`
    (blocks of many tiles); starts at zero.
    """
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == 'gappy':
        _, dense = random_csr(rng, 60, 130, 0.25, empty_rows=[0, 17, 59])
        dense[5] = 0
        dense[5, [4, 129]] = [1.5, -2.0]
        blocks = gappy_blocks(130)
        start = np.zeros(blocks.packed_size)
    elif name == 'tiles':
        _, dense = random_csr(rng, 19, 112, 0.35, empty_rows=[0, 11])
        dense[6, 5:38] = 0
        dense[7] = 0
        dense[7, 3] = 4.0
        blocks = tile_blocks()
        start = symmetric_blocks(rng, blocks)
    else:
        assert name == 'mixed', name
        _, dense = random_csr(rng, 300, 3000, 0.15, empty_rows=[0, 150, 299])
        blocks = mixed_blocks(3000)
        start = np.zeros(blocks.packed_size)
    return csr_from_dense(dense), dense, blocks, start
