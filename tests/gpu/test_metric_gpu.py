"""Tier 3: BlockMetric on CuPy against NumPy (skipped without a CUDA device,
see conftest.py); the block_outer kernel's own cases: test_block_outer.py
(every tier) and test_block_outer_gpu.py."""
import numpy as np
import pytest

from block_outer_cases import random_csr
from gradnet_cupy.kernels import CSR
from gradnet_cupy.metric import BlockMetric
from test_metric import layout_of

# a conv filter bank, a bias and a Linear, each its own link
LAYOUT = layout_of((16, 3, 5, 5), (16,), (10, 400))
N = 5216


def to_gpu(csr):
    import cupy
    return CSR(cupy.asarray(csr.indptr), cupy.asarray(csr.indices),
               cupy.asarray(csr.data), csr.shape)


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
    metric = BlockMetric.from_layout(LAYOUT, 'per_unit', max_block=None,
                                     device='gpu')
    metric.accumulate(to_gpu(train)).finalize()
    metric.save(tmp_path / 'metric.h5')
    loaded = BlockMetric.load(tmp_path / 'metric.h5', device='cpu')
    np.testing.assert_array_equal(loaded.inverse_sqrt(),
                                  metric.inverse_sqrt().get())
