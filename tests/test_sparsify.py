"""percentile_sparsify, gather_fixed and fixed_index_sets on every tier.

A test that takes ``backend`` runs on the NumPy reference, on the CUDA source
emulated on the CPU and on CuPy (kernel_backends.py). Each tier must give
the CSR of a plain-NumPy oracle (row by row, segment by segment, with
numpy.percentile) bit for bit, and the CUDA tiers the NumPy reference's too.
The argument checks and the NumPy path's blocks of rows are host code and run
once. GPU-only stress (large shapes, streams, caching): tests/gpu.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import (CSR, fixed_index_sets, gather_fixed,
                                  percentile_sparsify)
from gradnet_cupy.kernels.sparsify import (GPU_BLOCK, SAMPLE_KEYS, check_q,
                                           kept_capacity,
                                           percentile_sparsify_async,
                                           sample_ranks, segment_offsets,
                                           sparsify_launch_sequence,
                                           sparsify_launches)
from kernel_backends import per_tier
from sparsify_cases import (HARD_CASE_NAMES, NONFINITE, TINY,
                            assert_csr_identical, hard_case, with_nonfinite)


def oracle(g, sizes, q):
    """percentile_sparsify by its definition, one segment at a time."""
    indptr, indices, data = [0], [], []
    for row in g:
        start = 0
        for size in sizes:
            segment = row[start:start + size]
            magnitude = np.abs(segment).astype(np.float64)
            kept = np.flatnonzero(magnitude > np.percentile(magnitude, q))
            indices.extend(start + kept)
            data.extend(segment[kept])
            start += size
        indptr.append(len(indices))
    return CSR(np.array(indptr, dtype=np.int64),
               np.array(indices, dtype=np.int32),
               np.array(data, dtype=np.float32), g.shape)


def assert_sparsify_exact(backend, g, sizes, q=85.0, block=None):
    """The tier's CSR of host g equals the oracle's and (CUDA tiers) the
    NumPy reference's bit for bit; returns it."""
    result = backend.percentile_sparsify(g, sizes, q, block)
    assert_csr_identical(result, oracle(g, sizes, q))
    if backend.name != 'numpy':
        assert_csr_identical(result, percentile_sparsify(g, sizes, q))
    return result


@pytest.mark.parametrize('name', HARD_CASE_NAMES)
@pytest.mark.parametrize('backend, scale', per_tier(
    numpy=[3], emulated=[1], cupy=[1, 40]), indirect=['backend'])
def test_hard_cases(backend, scale, name):
    """``scale`` multiplies the segment lengths: what each tier affords."""
    assert_sparsify_exact(backend, *hard_case(name, scale))


@pytest.mark.backends('numpy', 'cupy')
def test_long_segment_matches_oracle(backend, rng):
    g = rng.standard_normal((3, 200_003)).astype(np.float32)
    g[1, ::5] = 0
    result = assert_sparsify_exact(backend, g, [200_000, 3], 85.0)
    assert 0.149 < result.nnz / g.size < 0.151


@pytest.mark.backends('numpy', 'cupy')
def test_cnn_layer_sizes_keep_fifteen_percent(backend, rng):
    sizes = [4800, 102400, 23040]
    g = rng.standard_normal((4, sum(sizes))).astype(np.float32)
    result = assert_sparsify_exact(backend, g, sizes)
    per_segment = np.add.reduceat(np.bincount(result.indices, minlength=g.shape[1]),
                                  [0, 4800, 4800 + 102400])
    np.testing.assert_array_equal(per_segment, 4 * (np.array(sizes) - (
        np.floor((np.array(sizes) - 1) * 0.85).astype(int) + 1)))


@pytest.mark.parametrize('rows_per_block', [1, 3, 7])
def test_blocks_of_rows(rows_per_block, rng, monkeypatch):
    """The NumPy path works through g in blocks of CHUNK_BYTES."""
    from gradnet_cupy.kernels import sparsify

    sizes = [5, 60, 35]
    g = rng.standard_normal((7, 100)).astype(np.float32)
    g[2] = 0
    monkeypatch.setattr(sparsify, 'CHUNK_BYTES', rows_per_block * 4 * 100)
    assert_csr_identical(percentile_sparsify(g, sizes), oracle(g, sizes, 85.0))


def test_threshold_is_float64_not_float32(backend):
    """Magnitudes 1 and 1 + ulp, q = 70: the float64 interpolation lies
    below 1 + ulp, so it survives; NumPy's float32 percentile rounds the
    threshold up to 1 + ulp and would drop it."""
    big = np.nextafter(np.float32(1), np.float32(2))
    g = np.array([[1.0, -big]], dtype=np.float32)
    assert np.percentile(np.abs(g[0]), 70) == big  # the float32 pitfall
    result = backend.percentile_sparsify(g, [2], 70.0)
    assert result.indices.tolist() == [1]
    assert result.data.tolist() == [-big]


def test_zeros_and_constant_segments_keep_nothing(backend):
    g = np.zeros((2, 9), dtype=np.float32)
    g[:, 4:] = [[0.5, -0.5, 0.5, 0.5, -0.5], [7, 7, 7, 7, 7]]
    result = backend.percentile_sparsify(g, [4, 5], 10.0)
    assert result.nnz == 0
    np.testing.assert_array_equal(result.indptr, [0, 0, 0])


def test_denormals_are_ordered_exactly(backend):
    g = np.array([[0, TINY, -2 * TINY, 3 * TINY, 0, 4 * TINY]], dtype=np.float32)
    # sorted magnitudes 0, 0, 1, 2, 3, 4 (x TINY): threshold 1.5 * TINY,
    # which float32 cannot hold (it would round to 2 * TINY)
    result = backend.percentile_sparsify(g, [6], 50.0)
    assert result.indices.tolist() == [2, 3, 5]


def test_signed_values_and_dtypes(backend, rng):
    g = rng.standard_normal((6, 50)).astype(np.float32)
    result = backend.percentile_sparsify(g, [20, 30], 60.0)
    assert result.indptr.dtype == np.int64 and result.indices.dtype == np.int32
    assert result.data.dtype == np.float32
    rows = np.repeat(np.arange(6), np.diff(result.indptr))
    np.testing.assert_array_equal(result.data, g[rows, result.indices])
    assert (np.diff(result.indices)[np.diff(rows) == 0] > 0).all()


def test_empty_batch(backend):
    result = backend.percentile_sparsify(np.zeros((0, 5), dtype=np.float32),
                                         [2, 3])
    assert result.shape == (0, 5) and result.nnz == 0
    np.testing.assert_array_equal(result.indptr, [0])


@pytest.mark.backends('emulated', 'cupy')
@pytest.mark.parametrize('block', [1, 2, 64])
def test_block_sizes(backend, block, rng):
    sizes = [1, 3, 40, 300]
    g = rng.standard_normal((3, sum(sizes))).astype(np.float32)
    g[1] = np.round(g[1])  # ties
    assert_sparsify_exact(backend, g, sizes, 85.0, block)


@pytest.mark.backends('emulated', 'cupy')
def test_gpu_block_size_over_several_tiles(backend, rng):
    """The block size of the CuPy path; 4,500 entries span two compaction
    tiles of 512 x 8."""
    g = rng.standard_normal((1, 5000)).astype(np.float32)
    assert_sparsify_exact(backend, g, [4500, 500], 85.0, GPU_BLOCK)


def test_compaction_tile_boundaries(backend, rng):
    sizes = [255, 256, 257, 513]  # tile = 32 threads x 8 entries
    g = rng.standard_normal((2, sum(sizes))).astype(np.float32)
    for q in (10.0, 85.0):  # dense and sparse output
        assert_sparsify_exact(backend, g, sizes, q)


# (shape, where the bad value sits, sizes): the GPU affords a larger batch
NONFINITE_BATCHES = {'small': ((3, 40), (2, 33), [30, 10]),
                     'large': ((50, 5000), (37, 4321), [1000, 4000])}


@pytest.mark.parametrize('bad', NONFINITE)
@pytest.mark.parametrize('backend, batch', per_tier(
    numpy=['small'], emulated=['small'], cupy=['small', 'large']),
    indirect=['backend'])
def test_nonfinite_g_is_refused(backend, batch, bad):
    """On the CUDA tiers through the kernel's device flag."""
    shape, at, sizes = NONFINITE_BATCHES[batch]
    with pytest.raises(GradnetError, match='NaN or Inf'):
        backend.percentile_sparsify(with_nonfinite(np, bad, shape, at), sizes)


_values = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, float(TINY),
                     -3 * float(TINY), 1e-38]),
    st.floats(width=32, allow_nan=False, allow_infinity=False))
# per tier: examples, most segments, most rows (the emulator affords fewer)
GENERATED = {'numpy': (150, 4, 4), 'emulated': (25, 3, 3), 'cupy': (150, 4, 4)}


@st.composite
def _problems(draw, max_segments, max_rows):
    sizes = draw(st.lists(st.integers(1, 70), min_size=1,
                          max_size=max_segments))
    rows = draw(st.integers(0, max_rows))
    g = draw(hnp.arrays(np.float32, (rows, sum(sizes)), elements=_values))
    q = draw(st.floats(0, 100, exclude_min=True, exclude_max=True))
    return g, sizes, q, draw(st.sampled_from([1, 4, 32]))


def test_generated_problems_match_oracle(backend):
    examples, max_segments, max_rows = GENERATED[backend.name]

    @settings(max_examples=examples, deadline=None)
    @given(_problems(max_segments, max_rows))
    def check(problem):
        g, sizes, q, block = problem
        assert_sparsify_exact(backend, g, sizes, q, block)

    check()


def test_mostly_zero_segments(backend, rng):
    """Segments of 85%, 90% and 100% exact zeros: at q = 85 and above the
    percentile is 0 or interpolates from 0, so exactly the nonzeros (or the
    ones above the interpolated threshold) survive."""
    sizes = [200, 100, 20, 7]
    g = rng.standard_normal((4, sum(sizes))).astype(np.float32)
    zero = rng.random(g.shape) < np.repeat([0.85, 0.9, 1.0, 0.9], sizes)
    g[zero] = 0
    g[1, :170] = 0                        # exactly 85% of segment 0
    g[1, 170:200] = rng.standard_normal(30)
    for q in (50.0, 85.0, 90.0, 97.0):
        assert_sparsify_exact(backend, g, sizes, q)


@settings(max_examples=100, deadline=None)
@given(_problems(4, 4))
def test_kept_entries_stay_within_the_capacity(problem):
    """The output bound the CUDA path allocates (kept_capacity, proved in
    its docstring): no row keeps more, and a segment of distinct magnitudes
    with a threshold below b keeps exactly m - 1 - lo."""
    g, sizes, q, _ = problem
    starts = segment_offsets(sizes, g.shape[1])
    per_row = np.diff(percentile_sparsify(g, sizes, q).indptr)
    assert (per_row <= kept_capacity(starts, q / 100)).all()


def test_capacity_is_reached_by_distinct_magnitudes():
    g = np.arange(1, 201, dtype=np.float32).reshape(2, 100)
    starts = segment_offsets([100], 100)
    assert kept_capacity(starts, 0.85) == 15
    result = percentile_sparsify(g, [100], 85.0)
    np.testing.assert_array_equal(result.indptr, [0, 15, 30])
    assert kept_capacity(segment_offsets([1, 5, 10], 16), 0.5) == 0 + 2 + 5


def test_async_form_gives_the_same_csr(backend, rng):
    """percentile_sparsify_async(...).result() is percentile_sparsify (the
    emulated tier: sparsify_launches, its CUDA path); the pending arrays of
    the CUDA path hold the capacity, the result views their first nnz."""
    sizes = [30, 70]
    g = rng.standard_normal((5, 100)).astype(np.float32)
    starts = segment_offsets(sizes, 100)
    if backend.name == 'emulated':
        pending = sparsify_launches(g, starts, 0.8,
                                    backend.launcher('sparsify.cu'), np, 32)
    else:
        pending = percentile_sparsify_async(backend.array(g), sizes, 80.0)
    result = backend.host_csr(pending.result())
    assert_csr_identical(result, oracle(g, sizes, 80.0))
    if backend.name != 'numpy':
        assert pending.indices.shape == (5 * kept_capacity(starts, 0.8),)


def emulated_run(backend, g, sizes, q, block, sample_keys):
    """The CUDA path on the emulated tier with ``sample_keys``; returns the
    host CSR and {kernel: bytes of g it read}."""
    reads = {}
    launch = backend.launcher('sparsify.cu')

    def counting(name, grid, threads, shared, args):
        traffic = launch(name, grid, threads, shared, args)
        reads[name] = traffic.by_argument.get(0, (0, 0))[0] if args[0] is g else 0
        return traffic

    result = sparsify_launch_sequence(g, segment_offsets(sizes, g.shape[1]),
                                      check_q(q) / 100.0, counting, np, block,
                                      sample_keys)
    return backend.host_csr(result), reads


@pytest.mark.backends('emulated')
def test_segments_staged_whole_over_several_chunks(backend, rng):
    """With the GPU's sample size every segment here is staged in shared
    memory once (sparsify_sample resolves it and counts the kept entries of
    its chunks of 32 x 16); split, resolve and fallback are not launched."""
    sizes = [1, 300, 1500]
    g = rng.standard_normal((2, sum(sizes))).astype(np.float32)
    g[1, 300:] = np.round(g[1, 300:])  # ties
    for q in (10.0, 85.0):
        result, reads = emulated_run(backend, g, sizes, q, 32, SAMPLE_KEYS)
        assert_csr_identical(result, oracle(g, sizes, q))
        assert reads == {'sparsify_sample': g.nbytes,
                         'sparsify_compact': g.nbytes}


@pytest.mark.backends('emulated')
def test_misleading_sample_takes_the_exact_fallback(backend, rng):
    """The sample of a 3,000-entry segment (8 runs of 32, evenly spaced from
    its first entry to its last, as sparsify.cu takes them) sees only tiny
    magnitudes, so the bracket lies below the target ranks and
    sparsify_fallback reads the whole segment; a constant 2,000-entry
    segment overflows its candidate buffer and falls back too. The result
    stays exact."""
    sizes, q = [3000, 2000], 30.0
    g = rng.standard_normal((2, 5000)).astype(np.float32) + 10
    sample = sample_ranks(3000, 899, 900, 0.3, 256)[0]
    assert sample == 8 * 32
    for run in range(8):
        first = run * (3000 - 32) // 7
        g[:, first:first + 32] = np.float32(1e-3)
    g[1, 3000:] = np.float32(-2.5)
    result, reads = emulated_run(backend, g, sizes, q, 32, 256)
    assert_csr_identical(result, oracle(g, sizes, q))
    # the fallback reads segment 0 of both rows five times (three radix
    # passes, the least key above a, the count per chunk) and the constant
    # segment four times (b = a)
    assert reads['sparsify_fallback'] == 4 * (5 * 2 * 3000 + 4 * 2000)


@pytest.mark.parametrize('q', [0, 100, -1, 100.5, float('nan'), '85', True, None])
def test_bad_q_is_refused(q):
    with pytest.raises(GradnetError, match='q must'):
        percentile_sparsify(np.ones((2, 4), dtype=np.float32), [4], q)


@pytest.mark.parametrize('sizes, message', [
    ([3], 'sum to 3'), ([2, 0, 2], 'positive'), ([5, -1], 'positive'),
    ([], 'non-empty'), ([[2, 2]], '1-D'), ([2.0, 2.0], 'ints')])
def test_bad_sizes_are_refused(sizes, message):
    with pytest.raises(GradnetError, match=message):
        percentile_sparsify(np.ones((2, 4), dtype=np.float32), sizes)


@pytest.mark.parametrize('g, message', [
    (np.ones(4, dtype=np.float32), '2-D'),
    (np.ones((1, 2, 2), dtype=np.float32), '2-D'),
    (np.ones((2, 4)), 'float32, got float64'),
    (np.ones((2, 4), dtype=np.int32), 'float32, got int32'),
    ([[1.0, 2.0, 3.0, 4.0]], 'NumPy or CuPy array')])
def test_bad_g_is_refused(g, message):
    with pytest.raises(GradnetError, match=message):
        percentile_sparsify(g, [4])


# gather_fixed and fixed_index_sets: array code without CUDA source, so the
# NumPy and CuPy tiers

def gather_oracle(g, sets, candidates):
    """gather_fixed by its definition, one row at a time."""
    indptr, indices, data = [0], [], []
    for row, label in zip(g, candidates):
        columns = sets[label]
        kept = columns[row[columns] != 0]
        indices.extend(kept)
        data.extend(row[kept])
        indptr.append(len(indices))
    return CSR(np.array(indptr, dtype=np.int64),
               np.array(indices, dtype=np.int32),
               np.array(data, dtype=np.float32), g.shape)


def index_sets_oracle(g, candidates, sizes, n_labels, fraction):
    """Per label, per segment: the best-scored columns by a Python sort."""
    sets = []
    for label in range(n_labels):
        score = np.abs(g[candidates == label].astype(np.float64)).mean(axis=0)
        chosen, start = [], 0
        for size in sizes:
            k = max(1, round(fraction * size))
            ranked = sorted(range(start, start + size), key=lambda j: (-score[j], j))
            chosen.extend(sorted(ranked[:k]))
            start += size
        sets.append(np.array(chosen))
    return sets


@pytest.mark.backends('numpy', 'cupy')
def test_fixed_index_sets_and_gather_match_oracles(backend, rng):
    sizes, n_labels = [40, 100, 7], 3
    sample = rng.standard_normal((30, sum(sizes))).astype(np.float32)
    sample[:, 50:60] *= 5  # important coordinates
    sample[:, 3] = 0
    labels = np.arange(30) % n_labels
    sets = fixed_index_sets(backend.array(sample), backend.array(labels),
                            sizes, n_labels, fraction=0.1)
    expected = index_sets_oracle(sample, labels, sizes, n_labels, 0.1)
    host_sets = backend.host_csr(sets)
    assert sets.shape == (n_labels, sum(sizes))
    for label in range(n_labels):
        row = host_sets.indices[host_sets.indptr[label]:host_sets.indptr[label + 1]]
        np.testing.assert_array_equal(row, expected[label])
        assert set(range(50, 60)) <= set(row.tolist())
    g = rng.standard_normal((12, sum(sizes))).astype(np.float32)
    g[::2, 50:55] = 0  # zeros are not stored
    candidates = rng.integers(0, n_labels, size=12)
    result = gather_fixed(backend.array(g), sets, backend.array(candidates))
    assert_csr_identical(backend.host_csr(result),
                         gather_oracle(g, expected, candidates))


@pytest.mark.backends('numpy', 'cupy')
def test_fixed_index_sets_break_ties_by_column(backend):
    sample = np.ones((2, 10), dtype=np.float32)
    sets = backend.host_csr(fixed_index_sets(backend.array(sample), [0, 0],
                                             [10], 1, fraction=0.3))
    assert sets.indices.tolist() == [0, 1, 2]
    assert sets.data.dtype == np.float32 and sets.data.tolist() == [1, 1, 1]


@pytest.mark.backends('numpy', 'cupy')
def test_gather_fixed_empty_batch(backend):
    sets = CSR(np.array([0, 2]), np.array([1, 3], dtype=np.int32),
               np.ones(2, dtype=np.float32), (1, 5))
    result = backend.host_csr(gather_fixed(
        backend.array(np.zeros((0, 5), dtype=np.float32)), backend.csr(sets),
        backend.array(np.zeros(0, dtype=np.int64))))
    assert result.shape == (0, 5) and result.nnz == 0
    np.testing.assert_array_equal(result.indptr, [0])


def _sets(indptr, indices, n=6):
    return CSR(np.array(indptr), np.array(indices, dtype=np.int32),
               np.ones(len(indices), dtype=np.float32), (len(indptr) - 1, n))


@pytest.mark.parametrize('sets, candidates, message', [
    (_sets([0, 2, 3], [1, 4, 0]), [0, 2], r'in \[0, 2\)'),
    (_sets([0, 2, 3], [1, 4, 0]), [[0, 1]], 'integer labels'),
    (_sets([0, 2, 3], [1, 4, 0]), [0.0, 1.0], 'integer labels'),
    (_sets([0, 2, 3], [4, 1, 0]), [0, 1], 'strictly increasing'),
    (_sets([0, 2, 3], [1, 1, 0]), [0, 1], 'strictly increasing'),
    (_sets([0, 2, 3], [1, 6, 0]), [0, 1], r'out of range \[0, 6\)'),
    (_sets([0, 3, 2], [1, 4, 0]), [0, 1], 'indptr'),
    (_sets([0, 2, 3], [1, 4, 0], n=7), [0, 1], 'one column per column'),
])
def test_gather_fixed_refuses_bad_input(sets, candidates, message):
    g = np.ones((2, 6), dtype=np.float32)
    with pytest.raises(GradnetError, match=message):
        gather_fixed(g, sets, np.array(candidates))


@pytest.mark.parametrize('bad', NONFINITE)
@pytest.mark.parametrize('backend, batch', per_tier(
    numpy=['small'], cupy=['small', 'large']), indirect=['backend'])
def test_gather_fixed_refuses_nonfinite_g(backend, batch, bad):
    """Even where the bad value lies outside every coordinate set."""
    shape, at, _ = NONFINITE_BATCHES[batch]
    n = shape[1]
    sets = fixed_index_sets(backend.array(np.ones((1, n), dtype=np.float32)),
                            [0], [n], 1)  # the first tenth of the columns
    assert at[1] not in backend.host_csr(sets).indices
    with pytest.raises(GradnetError, match='NaN or Inf'):
        gather_fixed(backend.array(with_nonfinite(np, bad, shape, at)), sets,
                     backend.array(np.zeros(shape[0], dtype=np.int64)))


@pytest.mark.parametrize('kwargs, message', [
    (dict(n_labels=3), 'no sample row has candidate label 2'),
    (dict(fraction=0.0), 'fraction'), (dict(fraction=1.5), 'fraction'),
    (dict(candidates=[0, 5, 1, 0]), r'in \[0, 2\)')])
def test_fixed_index_sets_refuses_bad_input(kwargs, message):
    args = dict(g_sample=np.ones((4, 6), dtype=np.float32),
                candidates=[0, 1, 1, 0], sizes=[2, 4], n_labels=2)
    args.update(kwargs)
    with pytest.raises(GradnetError, match=message):
        fixed_index_sets(**args)
