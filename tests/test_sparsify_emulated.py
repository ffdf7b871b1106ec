"""Tier 4: the CUDA source of percentile sparsification, executed on the CPU
through tests/cuda_emulation with the wrapper's own launch sequence, must
reproduce the NumPy reference exactly (indptr, indices, data bits)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cuda_emulation import package_module
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels.sparsify import (GPU_BLOCK, percentile_sparsify,
                                           segment_offsets,
                                           sparsify_launch_sequence)
from sparsify_cases import (NONFINITE, TINY, assert_csr_identical, hard_cases,
                            with_nonfinite)


def emulated(g, sizes, q, block=32):
    """percentile_sparsify through the CUDA kernels run on the CPU."""
    return sparsify_launch_sequence(
        g, segment_offsets(sizes, g.shape[1]), float(q) / 100.0,
        package_module('sparsify.cu').launch, np, block)


@pytest.mark.parametrize('name, g, sizes, q', [
    pytest.param(*case, id=case[0]) for case in hard_cases()])
def test_hard_cases_match_reference(name, g, sizes, q):
    assert_csr_identical(emulated(g, sizes, q), percentile_sparsify(g, sizes, q))


@pytest.mark.parametrize('block', [1, 2, 64])
def test_block_sizes(block, rng):
    sizes = [1, 3, 40, 300]
    g = rng.standard_normal((3, sum(sizes))).astype(np.float32)
    g[1] = np.round(g[1])  # ties
    assert_csr_identical(emulated(g, sizes, 85.0, block),
                         percentile_sparsify(g, sizes, 85.0))


def test_gpu_block_size_over_several_tiles(rng):
    """The block size of the CuPy path; 4,500 entries span two compaction
    tiles of 512 x 8."""
    sizes = [4500, 500]
    g = rng.standard_normal((1, 5000)).astype(np.float32)
    assert_csr_identical(emulated(g, sizes, 85.0, GPU_BLOCK),
                         percentile_sparsify(g, sizes, 85.0))


def test_compaction_tile_boundaries(rng):
    sizes = [255, 256, 257, 513]  # tile = 32 threads x 8 entries
    g = rng.standard_normal((2, sum(sizes))).astype(np.float32)
    for q in (10.0, 85.0):  # dense and sparse output
        assert_csr_identical(emulated(g, sizes, q), percentile_sparsify(g, sizes, q))


@pytest.mark.parametrize('bad', NONFINITE)
def test_nonfinite_raises_through_device_flag(bad):
    with pytest.raises(GradnetError, match='NaN or Inf'):
        emulated(with_nonfinite(np, bad), [30, 10], 85.0)


def test_empty_batch():
    result = emulated(np.zeros((0, 6), dtype=np.float32), [4, 2], 85.0)
    assert result.nnz == 0 and result.indptr.tolist() == [0]


@st.composite
def _problems(draw):
    sizes = draw(st.lists(st.integers(1, 70), min_size=1, max_size=3))
    rows = draw(st.integers(1, 3))
    values = st.one_of(st.sampled_from([0.0, 1.0, -2.0, float(TINY)]),
                       st.floats(width=32, allow_nan=False, allow_infinity=False))
    g = draw(hnp.arrays(np.float32, (rows, sum(sizes)), elements=values))
    q = draw(st.floats(0, 100, exclude_min=True, exclude_max=True))
    return g, sizes, q, draw(st.sampled_from([1, 4, 32]))


@settings(max_examples=25, deadline=None)
@given(_problems())
def test_generated_problems_match_reference(problem):
    g, sizes, q, block = problem
    assert_csr_identical(emulated(g, sizes, q, block), percentile_sparsify(g, sizes, q))
