"""GPU-only checks of the block_outer kernel: a block of many tiles run twice
(determinism, exact symmetry), the stream argument (ordered behind a busy
kernel, validation included), CUDA-graph capture, block sizes other than
512 and the auto dispatcher at 1% and 30% density (the cases every tier
runs: test_block_outer.py; the stream discipline on the CPU:
test_kernel_streams.py). Skipped without a CUDA device."""
import numpy as np
import pytest

from block_outer_cases import oracle, random_csr
from gradnet_cupy.backend import import_cupy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import CSR, Blocks, block_outer, block_outer_accumulate
from test_sparsify_gpu import busy

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


def test_stream_is_ordered_behind_a_busy_kernel(backend, rng):
    """The CSR's indices, the weights and G are written on the stream
    behind a busy kernel; validation and sums on the stream see them
    written (on another stream the reversed indices would be refused)."""
    csr, dense = random_csr(rng, 300, 700, 0.1)
    blocks = Blocks.contiguous([100, 600])
    weights = rng.random(300).astype(np.float32)
    indptr, final_indices, data, final_w = (
        cupy.asarray(a) for a in (csr.indptr, csr.indices, csr.data, weights))
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        indices = final_indices[::-1].copy()   # malformed until overwritten
        w = cupy.zeros_like(final_w)
        G = cupy.full(blocks.packed_size, np.nan)
    busy(stream)
    with stream:
        indices[...] = final_indices
        w[...] = final_w
    batch = CSR(indptr, indices, data, csr.shape)
    for method in ('sparse', 'dense'):
        with stream:
            G.fill(0)
        block_outer_accumulate(batch, blocks, G, w, stream=stream,
                               method=method)
        stream.synchronize()
        np.testing.assert_allclose(G.get(), oracle(dense, blocks, weights),
                                   rtol=1e-10, atol=1e-10)


def test_cuda_graph_capture_and_replay(backend, rng):
    """After a warm-up call, block_outer_accumulate(method='sparse',
    validate=False) captures into a CUDA graph; three replays add three
    times the sums."""
    csr, dense = random_csr(rng, 200, 600, 0.1)
    blocks = Blocks.contiguous([100, 200, 300])
    weights = rng.random(200).astype(np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        batch = backend.csr(csr)
        w = cupy.asarray(weights)
        G = cupy.zeros(blocks.packed_size)
        block_outer_accumulate(batch, blocks, G, w, stream=stream,
                               method='sparse')           # warm-up
        G.fill(0)
        stream.begin_capture()
        try:
            block_outer_accumulate(batch, blocks, G, w, stream=stream,
                                   method='sparse', validate=False)
        finally:
            graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(G.get(), 3 * oracle(dense, blocks, weights),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('method, validate', [
    ('dense', False), ('auto', False), ('sparse', True)])
def test_capture_refuses_what_waits_or_calls_cublas(backend, rng, method,
                                                     validate):
    """Under capture, 'dense' (cuBLAS, which CuPy refuses to capture),
    'auto' and validate (host reads) are one-line errors raised before
    anything is queued: G stays untouched."""
    csr, _ = random_csr(rng, 50, 600, 0.1)
    blocks = Blocks.contiguous([100, 200, 300])
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        batch = backend.csr(csr)
        G = cupy.zeros(blocks.packed_size)
        block_outer_accumulate(batch, blocks, G, stream=stream,
                               method='sparse')           # warm-up
        G.fill(0)
        stream.begin_capture()
        try:
            with pytest.raises(GradnetError, match='CUDA graph capture '
                               "needs method='sparse' and validate=False"):
                block_outer_accumulate(batch, blocks, G, stream=stream,
                                       method=method, validate=validate)
        finally:
            stream.end_capture()
    stream.synchronize()
    assert not G.any()


@pytest.mark.parametrize('sizes', [[100, 1000, 33], [2048], [64] * 20,
                                   [700, 1, 299]])
@pytest.mark.parametrize('method', ['sparse', 'dense'])
def test_block_sizes_other_than_512(backend, rng, sizes, method):
    csr, dense = random_csr(rng, 400, sum(sizes), 0.08)
    blocks = Blocks.contiguous(sizes)
    weights = rng.random(400).astype(np.float32)
    G = backend.block_outer(csr, blocks, np.zeros(blocks.packed_size),
                            weights, method)
    np.testing.assert_allclose(G, oracle(dense, blocks, weights),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('density, path', [(0.01, 'sparse'),
                                           (0.30, 'dense')])
def test_auto_dispatcher_at_1_and_30_percent(backend, rng, monkeypatch,
                                             density, path):
    """With the packaged GPU crossover (5%), 1% goes sparse and 30% dense;
    the sums are the oracle's either way."""
    csr, dense = random_csr(rng, 500, 1024, density)
    blocks = Blocks.contiguous([512, 512])
    calls = []
    for name in ('_dense', 'sparse_launch'):
        original = getattr(block_outer, name)

        def spy(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)
        monkeypatch.setattr(block_outer, name, spy)
    G = backend.block_outer(csr, blocks, np.zeros(blocks.packed_size),
                            None, 'auto')
    assert calls == [{'sparse': 'sparse_launch', 'dense': '_dense'}[path]]
    np.testing.assert_allclose(G, oracle(dense, blocks), rtol=1e-10,
                               atol=1e-10)
