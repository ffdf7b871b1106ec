"""Tier 3: the CUDA sparsify kernels against the NumPy reference on a real
GPU: the CSR must be bit-identical (skipped without a CUDA device)."""
import numpy as np
import pytest

from gradnet_cupy.backend import import_cupy, to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import (CSR, fixed_index_sets, gather_fixed,
                                  percentile_sparsify)
from sparsify_cases import NONFINITE, assert_csr_identical, hard_cases, with_nonfinite

cupy = import_cupy()  # None without CuPy; conftest skips every test then


def on_host(csr):
    return CSR(*(to_numpy(a) for a in csr[:3]), csr.shape)


def assert_gpu_matches_numpy(g, sizes, q=85.0, **kwargs):
    """Runs both paths on the host array g; returns the GPU result."""
    result = percentile_sparsify(cupy.asarray(g), sizes, q, **kwargs)
    assert all(isinstance(a, cupy.ndarray) for a in result[:3])
    assert_csr_identical(on_host(result), percentile_sparsify(g, sizes, q))
    return result


@pytest.mark.parametrize('name, g, sizes, q', [
    pytest.param(*case, id=f'{case[0]}-x{scale}')
    for scale in (1, 40) for case in hard_cases(scale)])
def test_hard_cases(name, g, sizes, q):
    assert_gpu_matches_numpy(g, sizes, q)


@pytest.mark.parametrize('rows, sizes', [
    (256, [4800, 102400, 23040]),  # the cnn layer blocks
    (8, [1_000_000]),
    (2, [2**21 + 5, 3]),
    (3000, [1, 2, 5, 33]),
    (64, [37] * 50),
    (1, [1])])
@pytest.mark.parametrize('q', [50.0, 85.0, 99.0])
def test_shapes(rows, sizes, q):
    rng = np.random.default_rng(rows + len(sizes))
    g = rng.standard_normal((rows, sum(sizes))).astype(np.float32)
    g[:, ::11] = 0
    assert_gpu_matches_numpy(g, sizes, q)


def test_heavy_ties_in_a_million_entry_segment():
    rng = np.random.default_rng(3)
    g = rng.integers(-3, 4, size=(4, 1_000_000)).astype(np.float32)
    assert_gpu_matches_numpy(g, [1_000_000], 85.0)


@pytest.mark.parametrize('bad', NONFINITE)
def test_nonfinite_raises_through_device_flag(bad):
    g = with_nonfinite(cupy, bad, shape=(50, 5000), at=(37, 4321))
    with pytest.raises(GradnetError, match='NaN or Inf'):
        percentile_sparsify(g, [1000, 4000])
    with pytest.raises(GradnetError, match='NaN or Inf'):
        gather_fixed(g, fixed_index_sets(cupy.ones((1, 5000), dtype=cupy.float32),
                                         [0], [5000], 1), cupy.zeros(50, dtype=cupy.int64))


def test_stream_argument():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((64, 6000)).astype(np.float32)
    before = cupy.cuda.get_current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)
    result = percentile_sparsify(cupy.asarray(g), [1000, 5000], stream=stream)
    stream.synchronize()
    assert cupy.cuda.get_current_stream().ptr == before.ptr
    assert_csr_identical(on_host(result), percentile_sparsify(g, [1000, 5000]))


def test_non_contiguous_input_and_determinism():
    rng = np.random.default_rng(6)
    g = rng.standard_normal((32, 8000)).astype(np.float32)[:, ::2]
    first = assert_gpu_matches_numpy(g, [1000, 3000])
    second = percentile_sparsify(cupy.asarray(g), [1000, 3000])
    assert_csr_identical(on_host(second), on_host(first))


def test_gather_fixed_matches_numpy():
    rng = np.random.default_rng(7)
    sizes = [4800, 102400, 23040]
    sample = rng.standard_normal((40, sum(sizes))).astype(np.float32)
    labels = np.arange(40) % 10
    sets = fixed_index_sets(sample, labels, sizes, 10)
    gpu_sets = fixed_index_sets(cupy.asarray(sample), cupy.asarray(labels), sizes, 10)
    assert_csr_identical(on_host(gpu_sets), sets)
    g = rng.standard_normal((128, sum(sizes))).astype(np.float32)
    g[:, ::3] = 0
    candidates = rng.integers(0, 10, size=128)
    result = gather_fixed(cupy.asarray(g), gpu_sets, cupy.asarray(candidates))
    assert_csr_identical(on_host(result), gather_fixed(g, sets, candidates))


def test_compiled_module_is_cached_per_device():
    """kernels/_cuda.py keeps no cache: CuPy hands every RawModule of one
    source, options and name expressions the module it loaded on this
    device (compiled once)."""
    from gradnet_cupy.kernels._cuda import raw_module
    from gradnet_cupy.kernels.block_outer import (CUDA_NAME_EXPRESSIONS,
                                                  CUDA_SOURCE)

    percentile_sparsify(cupy.ones((2, 10), dtype=cupy.float32), [10])
    assert raw_module('sparsify.cu').module is raw_module('sparsify.cu').module
    first, second = (raw_module(CUDA_SOURCE,
                                name_expressions=CUDA_NAME_EXPRESSIONS)
                     for _ in range(2))
    assert first.module is second.module
