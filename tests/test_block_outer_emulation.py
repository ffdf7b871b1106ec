"""Tier 4: the CUDA kernel of block_outer.cu, run on the CPU through
tests/cuda_emulation with the launch sequence of the CuPy wrapper, against
the NumPy reference and the dense oracle."""
import numpy as np
import pytest

from block_outer_cases import abs_oracle, csr_from_dense, oracle, random_csr
from cuda_emulation import package_module
from gradnet_cupy.kernels import Blocks, block_outer_accumulate
from gradnet_cupy.kernels.block_outer import (
    CUDA_NAME_EXPRESSIONS, CUDA_SOURCE, CUDA_TILE, sparse_launch, tile_list)

# blocks of 1, 2 and 3 columns, one of two tiles per side (a partial
# off-diagonal tile) and one of three; columns 3, 4, 38 and 110.. in none
BLOCKS = Blocks([0, 1, 5, 39, 105], [1, 2, 33, 66, 3], 112)
TOLERANCE = {np.float64: 1e-13, np.float32: 1e-6}


def symmetric_blocks(rng, blocks):
    """Packed random symmetric blocks (float64)."""
    parts = []
    for size in blocks.sizes:
        a = rng.standard_normal((size, size))
        parts.append((a + a.T).ravel())
    return np.concatenate(parts)


def emulated(csr, blocks, G, weights, selected):
    sparse_launch(package_module(CUDA_SOURCE, CUDA_NAME_EXPRESSIONS).launch,
                  csr, blocks, G, weights, selected)
    return G


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_kernel_matches_reference_and_oracle(rng, dtype):
    csr, dense = random_csr(rng, 19, 112, 0.35, empty_rows=[0, 11])
    dense[6, 5:38] = 0                 # a row with nothing in block 2
    dense[7] = 0
    dense[7, 3] = 4.0                  # a row with entries outside blocks only
    csr = csr_from_dense(dense)
    weights = rng.random(19).astype(np.float32)
    start = symmetric_blocks(rng, BLOCKS).astype(dtype)
    G = emulated(csr, BLOCKS, start.copy(), weights,
                 np.ones(len(BLOCKS), dtype=bool))
    reference = block_outer_accumulate(csr, BLOCKS, start.copy(), weights,
                                       method='sparse')
    expected = start.astype(np.float64) + oracle(dense, BLOCKS, weights)
    scale = np.abs(start) + abs_oracle(dense, BLOCKS, weights)
    for result in (G, reference):
        assert (np.abs(result - expected)
                <= TOLERANCE[dtype] * np.maximum(scale, 1e-30)).all()
    # G stays exactly symmetric in every block
    for b, size in enumerate(BLOCKS.sizes):
        block = G[BLOCKS.offsets[b]:BLOCKS.offsets[b + 1]].reshape(size, size)
        assert np.array_equal(block, block.T)


@pytest.mark.parametrize('rows', [0, 300])
def test_kernel_row_chunks(rng, rows):
    """No rows at all, and more rows than one chunk of run searches."""
    csr, dense = random_csr(rng, rows, 40, 0.3)
    blocks = Blocks([0], [40], 40)
    weights = rng.random(rows).astype(np.float32)
    G = emulated(csr, blocks, np.ones(blocks.packed_size), weights,
                 np.ones(1, dtype=bool))
    np.testing.assert_allclose(G, 1 + oracle(dense, blocks, weights),
                               rtol=1e-13, atol=1e-13)


def test_kernel_touches_only_selected_blocks(rng):
    csr, dense = random_csr(rng, 9, 112, 0.5)
    selected = np.array([True, False, True, False, True])
    G = emulated(csr, BLOCKS, np.zeros(BLOCKS.packed_size), np.ones(
        9, dtype=np.float32), selected)
    expected = oracle(dense, BLOCKS)
    for b in range(len(BLOCKS)):
        part = slice(BLOCKS.offsets[b], BLOCKS.offsets[b + 1])
        want = expected[part] if selected[b] else 0
        np.testing.assert_allclose(G[part], want, rtol=1e-13, atol=1e-13)


def test_tile_list_covers_upper_triangles():
    block, row, col = tile_list(BLOCKS, np.ones(len(BLOCKS), dtype=bool))
    per_side = -(-BLOCKS.sizes // CUDA_TILE)          # 1, 1, 2, 3, 1
    assert np.bincount(block).tolist() == (per_side * (per_side + 1) // 2
                                           ).tolist()
    assert (row <= col).all() and (col < per_side[block]).all()
    assert len(set(zip(block, row, col))) == len(block)
