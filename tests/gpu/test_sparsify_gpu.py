"""GPU-only checks of the CUDA sparsify kernels: shapes too large for the
other tiers, streams, determinism and the compiled-module cache, against the
NumPy reference bit for bit (the cases every tier runs: test_sparsify.py).
Skipped without a CUDA device."""
import numpy as np
import pytest

from gradnet_cupy.backend import import_cupy
from gradnet_cupy.kernels import (fixed_index_sets, gather_fixed,
                                  percentile_sparsify)
from sparsify_cases import assert_csr_identical

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
