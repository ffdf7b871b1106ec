"""Tier 3: block_outer_accumulate and BlockMetric on CuPy against NumPy
(skipped without a CUDA device, see conftest.py)."""
import numpy as np
import pytest

from block_outer_cases import abs_oracle, oracle, random_csr
from gradnet_cupy.kernels import CSR, Blocks, block_outer_accumulate
from gradnet_cupy.metric import BlockMetric

TOLERANCE = {np.float64: 1e-13, np.float32: 1e-6}
LAYOUT = [(0, (16, 3, 5, 5)), (1200, (16,)), (1216, (10, 400))]
N = 5216


def to_gpu(csr):
    import cupy
    return CSR(cupy.asarray(csr.indptr), cupy.asarray(csr.indices),
               cupy.asarray(csr.data), csr.shape)


def mixed_blocks(columns):
    """Sizes 1, 2, 31, 33, 100, 1000 (several tiles) and the rest,
    with gaps."""
    starts = [0, 2, 10, 41, 80, 200, 1300]
    sizes = [1, 2, 31, 33, 100, 1000, columns - 1300 - 7]
    return Blocks(starts, sizes, columns)


@pytest.mark.parametrize('method', ['sparse', 'dense', 'auto'])
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_gpu_matches_numpy(rng, method, dtype):
    import cupy
    csr, dense = random_csr(rng, 300, 3000, 0.15, empty_rows=[0, 150, 299])
    blocks = mixed_blocks(3000)
    weights = rng.random(300).astype(np.float32)
    G = cupy.zeros(blocks.packed_size, dtype=dtype)
    block_outer_accumulate(to_gpu(csr), blocks, G, cupy.asarray(weights),
                           method=method)
    reference = np.zeros(blocks.packed_size, dtype=dtype)
    block_outer_accumulate(csr, blocks, reference, weights, method='sparse')
    expected = oracle(dense, blocks, weights)
    bound = TOLERANCE[dtype] * np.maximum(abs_oracle(dense, blocks, weights),
                                          1e-30)
    assert (np.abs(G.get() - expected) <= bound).all()
    assert (np.abs(reference - expected) <= bound).all()


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_sparse_kernel_is_deterministic_and_symmetric(rng, dtype):
    import cupy
    csr, _ = random_csr(rng, 2000, 2048, 0.15)
    blocks = Blocks.contiguous([2048])
    runs = []
    for _ in range(2):
        G = cupy.zeros(blocks.packed_size, dtype=dtype)
        block_outer_accumulate(to_gpu(csr), blocks, G, method='sparse')
        runs.append(G.get())
    assert np.array_equal(runs[0], runs[1])
    square = runs[0].reshape(2048, 2048)
    assert np.array_equal(square, square.T)


def test_stream_argument(rng):
    import cupy
    csr, dense = random_csr(rng, 50, 300, 0.2)
    blocks = Blocks.contiguous([100, 200])
    stream = cupy.cuda.Stream(non_blocking=True)
    G = cupy.zeros(blocks.packed_size)
    block_outer_accumulate(to_gpu(csr), blocks, G, stream=stream,
                           method='sparse')
    stream.synchronize()
    np.testing.assert_allclose(G.get(), oracle(dense, blocks), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize('partition', ['per_layer', 'per_unit', 'diagonal'])
def test_metric_on_gpu_matches_cpu(rng, partition):
    train, dense = random_csr(rng, 400, N, 0.15)
    test, _ = random_csr(rng, 30, N, 0.15, empty_rows=[3])
    metrics = []
    for device, batch in (('cpu', train), ('gpu', to_gpu(train))):
        metric = BlockMetric.from_layout(LAYOUT, partition, max_block=512,
                                         device=device)
        metric.accumulate(batch).finalize(1e-2)
        metrics.append(metric)
    cpu, gpu = metrics
    np.testing.assert_allclose(gpu.G.get(), cpu.G, rtol=1e-10,
                               atol=1e-12 * np.abs(cpu.G).max())
    np.testing.assert_allclose(gpu.damping, cpu.damping, rtol=1e-9)
    expected = cpu.apply(test).to_scipy().toarray()
    got = gpu.apply(to_gpu(test)).to_scipy().toarray()
    np.testing.assert_allclose(got, expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())


def test_metric_gpu_save_load(rng, tmp_path):
    train, _ = random_csr(rng, 100, N, 0.15)
    metric = BlockMetric.from_layout(LAYOUT, 'per_unit', device='gpu')
    metric.accumulate(to_gpu(train)).finalize()
    metric.save(tmp_path / 'metric.h5')
    loaded = BlockMetric.load(tmp_path / 'metric.h5', device='cpu')
    np.testing.assert_array_equal(loaded.inverse_sqrt(),
                                  metric.inverse_sqrt().get())
