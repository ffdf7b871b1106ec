"""GPU-only checks of the CUDA sparsify kernels: shapes too large for the
other tiers (over 2^31 entries), segments of mostly zeros, thread-block
sizes other than 512, streams (ordered behind a busy kernel, no host wait
before the end), CUDA-graph capture, determinism and the compiled-module
cache, against the NumPy reference bit for bit (the cases every tier runs:
test_sparsify.py; the stream discipline on the CPU: test_kernel_streams.py).
Skipped without a CUDA device."""
import numpy as np
import pytest

from gradnet_cupy.backend import import_cupy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import (fixed_index_sets, gather_fixed,
                                  percentile_sparsify)
from gradnet_cupy.kernels.sparsify import percentile_sparsify_async
from sparsify_cases import assert_csr_identical

# one thread spinning for ``cycles`` clock ticks: keeps a stream busy, so
# that work queued behind it on that stream runs late, and anything that
# ran on another stream would see the inputs unwritten
SPIN = r'''
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) { }
}'''

cupy = import_cupy()  # None without CuPy; conftest skips every test then
pytestmark = pytest.mark.backends('cupy')


def assert_gpu_matches_numpy(backend, g, sizes, q=85.0):
    """Runs both paths on the host array g; returns the GPU result (host)."""
    result = backend.percentile_sparsify(g, sizes, q)
    assert_csr_identical(result, percentile_sparsify(g, sizes, q))
    return result


@pytest.mark.parametrize('rows, sizes', [
    (256, [4800, 102400, 23040]),  # the cnn layer blocks
    (8, [1_000_000]),
    (2, [2**21 + 5, 3]),
    (3000, [1, 2, 5, 33]),
    (64, [37] * 50),
    (1, [1])])
@pytest.mark.parametrize('q', [50.0, 85.0, 99.0])
def test_shapes(backend, rows, sizes, q):
    rng = np.random.default_rng(rows + len(sizes))
    g = rng.standard_normal((rows, sum(sizes))).astype(np.float32)
    g[:, ::11] = 0
    assert_gpu_matches_numpy(backend, g, sizes, q)


def test_heavy_ties_in_a_million_entry_segment(backend):
    rng = np.random.default_rng(3)
    g = rng.integers(-3, 4, size=(4, 1_000_000)).astype(np.float32)
    assert_gpu_matches_numpy(backend, g, [1_000_000], 85.0)


def test_stream_argument(backend):
    rng = np.random.default_rng(5)
    g = rng.standard_normal((64, 6000)).astype(np.float32)
    before = cupy.cuda.get_current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)
    result = percentile_sparsify(cupy.asarray(g), [1000, 5000], stream=stream)
    stream.synchronize()
    assert cupy.cuda.get_current_stream().ptr == before.ptr
    assert_csr_identical(backend.host_csr(result),
                         percentile_sparsify(g, [1000, 5000]))


def test_non_contiguous_input_and_determinism(backend):
    rng = np.random.default_rng(6)
    g = rng.standard_normal((32, 8000)).astype(np.float32)[:, ::2]
    first = assert_gpu_matches_numpy(backend, g, [1000, 3000])
    assert_csr_identical(backend.percentile_sparsify(g, [1000, 3000]), first)


def test_gather_fixed_matches_numpy(backend):
    rng = np.random.default_rng(7)
    sizes = [4800, 102400, 23040]
    sample = rng.standard_normal((40, sum(sizes))).astype(np.float32)
    labels = np.arange(40) % 10
    sets = fixed_index_sets(sample, labels, sizes, 10)
    gpu_sets = fixed_index_sets(backend.array(sample), backend.array(labels),
                                sizes, 10)
    assert_csr_identical(backend.host_csr(gpu_sets), sets)
    g = rng.standard_normal((128, sum(sizes))).astype(np.float32)
    g[:, ::3] = 0
    candidates = rng.integers(0, 10, size=128)
    result = gather_fixed(backend.array(g), gpu_sets, backend.array(candidates))
    assert_csr_identical(backend.host_csr(result),
                         gather_fixed(g, sets, candidates))


def test_compiled_module_is_cached_per_device(backend):
    """kernels/_cuda.py keeps no cache: CuPy hands every RawModule of one
    source, options and name expressions the module it loaded on this
    device (compiled once)."""
    from gradnet_cupy.kernels._cuda import raw_module
    from gradnet_cupy.kernels.block_outer import (CUDA_NAME_EXPRESSIONS,
                                                  CUDA_SOURCE)

    backend.percentile_sparsify(np.ones((2, 10), dtype=np.float32), [10])
    assert raw_module('sparsify.cu').module is raw_module('sparsify.cu').module
    first, second = (raw_module(CUDA_SOURCE,
                                name_expressions=CUDA_NAME_EXPRESSIONS)
                     for _ in range(2))
    assert first.module is second.module


def busy(stream, cycles=300_000_000):
    """Queues a kernel of about 0.15 s (2 GHz) on ``stream``."""
    with stream:
        cupy.RawKernel(SPIN, 'spin')((1,), (1,), (np.int64(cycles),))


def test_stream_is_ordered_behind_a_busy_kernel(backend):
    """g is written on the stream behind a busy kernel, then sparsified on
    it at once: anything on another stream (or a host read of g before the
    end) would see zeros. The current stream stays as it was."""
    rng = np.random.default_rng(11)
    sizes = [3000, 5000]
    host = rng.standard_normal((256, 8000)).astype(np.float32)
    source = cupy.asarray(host)
    cupy.cuda.Device().synchronize()
    before = cupy.cuda.get_current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        g = cupy.zeros_like(source)
    busy(stream)
    with stream:
        g[...] = source
    result = percentile_sparsify(g, sizes, stream=stream)
    assert cupy.cuda.get_current_stream().ptr == before.ptr
    assert_csr_identical(backend.host_csr(result),
                         percentile_sparsify(host, sizes))


def test_cuda_graph_capture_and_replay(backend):
    """After a warm-up call, percentile_sparsify_async captures into a CUDA
    graph (a host wait inside would end the capture with an error); each
    replay on new contents of g gives the NumPy result."""
    rng = np.random.default_rng(12)
    sizes = [1000, 3000, 7]
    hosts = [rng.standard_normal((32, 4007)).astype(np.float32)
             for _ in range(3)]
    hosts[2][5, 100] = np.inf
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        g = cupy.asarray(hosts[0])
        percentile_sparsify(g, sizes, stream=stream)   # warm-up
        stream.begin_capture()
        try:
            pending = percentile_sparsify_async(g, sizes, stream=stream)
        finally:
            graph = stream.end_capture()
    for host in hosts[:2]:
        g.set(host, stream=stream)
        graph.launch(stream=stream)
        assert_csr_identical(backend.host_csr(pending.result()),
                             percentile_sparsify(host, sizes))
    g.set(hosts[2], stream=stream)
    graph.launch(stream=stream)
    with pytest.raises(GradnetError, match='NaN or Inf'):
        pending.result()


@pytest.mark.parametrize('zeros', [0.85, 0.9, 0.99, 1.0])
@pytest.mark.parametrize('q', [85.0, 95.0])
def test_segments_of_mostly_exact_zeros(backend, zeros, q):
    rng = np.random.default_rng(int(zeros * 100) + int(q))
    sizes = [4800, 102400, 23040]
    g = rng.standard_normal((64, sum(sizes))).astype(np.float32)
    g[rng.random(g.shape) < zeros] = 0
    assert_gpu_matches_numpy(backend, g, sizes, q)


@pytest.mark.parametrize('block', [32, 128, 256, 1024])
def test_thread_block_sizes_other_than_512(backend, block):
    rng = np.random.default_rng(block)
    sizes = [1, 37, 4800, 102400, 70_001]
    g = rng.standard_normal((24, sum(sizes))).astype(np.float32)
    g[:, ::5] = np.round(g[:, ::5])   # ties
    result = backend.percentile_sparsify(g, sizes, 85.0, block)
    assert_csr_identical(result, percentile_sparsify(g, sizes, 85.0))


@pytest.mark.parametrize('sample_keys', [64, 256])
def test_small_samples_and_the_fallback(backend, sample_keys):
    """Short samples (sparsify_launches' sample_keys) put most segments on
    the sampled path and make the bracket miss or overflow more often
    (ties, a constant segment): every path stays bit-identical."""
    rng = np.random.default_rng(sample_keys)
    sizes = [40, 3000, 20_000, 2000]
    g = rng.standard_normal((16, sum(sizes))).astype(np.float32)
    g[:, ::3] = np.round(g[:, ::3])
    g[5, 23_040:] = np.float32(0.5)
    for q in (30.0, 85.0, 99.0):
        result = backend.host_csr(backend.launch_sequence(
            cupy.asarray(g), sizes, q, 512, sample_keys))
        assert_csr_identical(result, percentile_sparsify(g, sizes, q))


def test_more_than_2_to_31_entries(backend):
    """2 x (2^30 + 3) entries (int64 offsets in every kernel); the NumPy
    reference takes about a minute on the host."""
    rows, n = 2, 2**30 + 3
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 24 * 2**30:
        pytest.skip(f'needs 24 GiB of free device memory, {free >> 30} free')
    sizes = [2**29, 2**29 + 3]
    g = cupy.random.default_rng(13).standard_normal((rows, n),
                                                    dtype=cupy.float32)
    g[:, ::9] = 0
    result = backend.host_csr(percentile_sparsify(g, sizes, 85.0))
    host = g.get()
    del g
    assert_csr_identical(result, percentile_sparsify(host, sizes, 85.0))
