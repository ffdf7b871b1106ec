"""GPU-only checks of the block_outer kernel: a block of many tiles run twice
(determinism, exact symmetry) and the stream argument (the cases every tier
runs: test_block_outer.py). Skipped without a CUDA device."""
import numpy as np
import pytest

from block_outer_cases import oracle, random_csr
from gradnet_cupy.backend import import_cupy
from gradnet_cupy.kernels import Blocks, block_outer_accumulate

cupy = import_cupy()  # None without CuPy; conftest skips every test then
pytestmark = pytest.mark.backends('cupy')


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_sparse_kernel_is_deterministic_and_symmetric(backend, rng, dtype):
    csr, _ = random_csr(rng, 2000, 2048, 0.15)
    blocks = Blocks.contiguous([2048])
    runs = [backend.block_outer(csr, blocks,
                                np.zeros(blocks.packed_size, dtype=dtype),
                                None, 'sparse') for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    square = runs[0].reshape(2048, 2048)
    assert np.array_equal(square, square.T)


def test_stream_argument(backend, rng):
    csr, dense = random_csr(rng, 50, 300, 0.2)
    blocks = Blocks.contiguous([100, 200])
    stream = cupy.cuda.Stream(non_blocking=True)
    G = cupy.zeros(blocks.packed_size)
    block_outer_accumulate(backend.csr(csr), blocks, G, stream=stream,
                           method='sparse')
    stream.synchronize()
    np.testing.assert_allclose(backend.host(G), oracle(dense, blocks),
                               rtol=1e-12, atol=1e-12)
