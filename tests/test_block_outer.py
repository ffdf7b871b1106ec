"""block_outer_accumulate on every tier against the dense oracle.

A test that takes ``backend`` runs on the NumPy reference, on the CUDA kernel
emulated on the CPU and on CuPy (kernel_backends.py); each tier must agree
with the dense oracle within the rounding contract of kernels/block_outer.py,
and the CUDA tiers' NumPy reference too. The crossover table, Blocks and the
argument checks are host code and run once. GPU-only stress: tests/gpu.
"""
import numpy as np
import pytest

from block_outer_cases import (abs_oracle, block_case, csr_from_dense,
                               gappy_blocks,
                               oracle, random_csr, tile_blocks)
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import Blocks, block_outer_accumulate
from gradnet_cupy.kernels import block_outer
from gradnet_cupy.kernels.block_outer import CUDA_TILE, METHODS, tile_list
from kernel_backends import per_tier

# Rounding contract (kernels/block_outer.py): entries agree to a few units of
# G's precision times the sum of |terms|.
TOLERANCE = {np.float64: 1e-13, np.float32: 1e-6}


def assert_close(G, expected, scale):
    bound = TOLERANCE[G.dtype.type] * np.maximum(scale, 1e-30)
    excess = np.abs(G.astype(np.float64) - expected) - bound
    assert excess.max() <= 0, f'worst excess {excess.max()}'


def assert_blocks_symmetric(G, blocks):
    for b, size in enumerate(blocks.sizes):
        block = G[blocks.offsets[b]:blocks.offsets[b + 1]].reshape(size, size)
        assert np.array_equal(block, block.T)


def _runs(cases, methods=METHODS, weighted=(False, True)):
    return [(case, method, w) for case in cases for method in methods
            for w in weighted]


# (case of block_outer_cases.block_case, method, weighted) per tier: the
# emulator affords the CUDA kernel on the small case with weights
ORACLE_RUNS = per_tier(numpy=_runs(['gappy', 'tiles']),
                       emulated=_runs(['tiles'], ['sparse'], [True]),
                       cupy=_runs(['gappy', 'tiles', 'mixed']))


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
@pytest.mark.parametrize('backend, run', ORACLE_RUNS, indirect=['backend'])
def test_matches_dense_oracle(backend, run, dtype, rng):
    case, method, weighted = run
    csr, dense, blocks, start = block_case(case)
    start = start.astype(dtype)
    weights = rng.random(csr.shape[0]).astype(np.float32) if weighted else None
    G = backend.block_outer(csr, blocks, start, weights, method)
    expected = start.astype(np.float64) + oracle(dense, blocks, weights)
    scale = np.abs(start) + abs_oracle(dense, blocks, weights)
    assert_close(G, expected, scale)
    if method == 'sparse':  # one fixed order of the terms of G_jk and G_kj
        assert_blocks_symmetric(G, blocks)
    if backend.name != 'numpy':
        reference = block_outer_accumulate(csr, blocks, start.copy(), weights,
                                           method='sparse')
        assert_close(reference, expected, scale)


@pytest.mark.backends('numpy', 'cupy')
def test_accumulates_in_place_over_batches(backend, rng):
    csr, dense = random_csr(rng, 90, 64, 0.3, empty_rows=[40])
    blocks = Blocks.contiguous([16, 16, 32])
    weights = rng.random(90).astype(np.float32)
    once = backend.block_outer(csr, blocks, np.zeros(blocks.packed_size),
                               weights, 'auto')
    split = backend.array(np.zeros(blocks.packed_size))
    for lo, hi in [(0, 25), (25, 26), (26, 90)]:
        part = backend.csr(csr_from_dense(dense[lo:hi]))
        assert block_outer_accumulate(
            part, blocks, split, backend.array(weights[lo:hi]),
            method='sparse' if lo else 'dense') is split
    np.testing.assert_allclose(backend.host(split), once, rtol=1e-12,
                               atol=1e-13 * np.abs(once).max())


@pytest.mark.backends('numpy', 'cupy')
def test_sparse_and_dense_paths_agree_on_one_block(backend, rng):
    # a run of length one, a block wider than the rows and an empty batch
    for rows, columns, density in [(1, 1, 1.0), (3, 300, 0.1), (0, 8, 0.5)]:
        csr, dense = random_csr(rng, rows, columns, density)
        blocks = Blocks([0], [columns], columns)
        expected = 0.5 + oracle(dense, blocks)
        for method in ('sparse', 'dense'):
            G = backend.block_outer(csr, blocks,
                                    np.full(blocks.packed_size, 0.5), None,
                                    method)
            np.testing.assert_allclose(G, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('rows', [0, 300])
def test_row_chunks(backend, rng, rows):
    """No rows at all, and more rows than one chunk of the kernel's run
    searches."""
    csr, dense = random_csr(rng, rows, 40, 0.3)
    blocks = Blocks([0], [40], 40)
    weights = rng.random(rows).astype(np.float32)
    G = backend.block_outer(csr, blocks, np.ones(blocks.packed_size),
                            weights, 'sparse')
    np.testing.assert_allclose(G, 1 + oracle(dense, blocks, weights),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.backends('emulated', 'cupy')
def test_kernel_touches_only_selected_blocks(backend, rng):
    blocks = tile_blocks()
    csr, dense = random_csr(rng, 9, 112, 0.5)
    selected = np.array([True, False, True, False, True])
    G = backend.sparse_kernel(csr, blocks, np.zeros(blocks.packed_size),
                              np.ones(9, dtype=np.float32), selected)
    expected = oracle(dense, blocks)
    for b in range(len(blocks)):
        part = slice(blocks.offsets[b], blocks.offsets[b + 1])
        want = expected[part] if selected[b] else 0
        np.testing.assert_allclose(G[part], want, rtol=1e-13, atol=1e-13)


@pytest.mark.backends('emulated', 'cupy')
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_kernel_is_deterministic_and_symmetric(backend, rng, dtype):
    """block_outer.cu adds every entry's terms in row order into one
    accumulator: two calls give identical bits, and every diagonal block
    stays exactly symmetric (mirrored entries get bitwise equal terms)."""
    csr, _ = random_csr(rng, 70, 112, 0.4)
    blocks = tile_blocks()
    weights = rng.random(70).astype(np.float32)
    runs = [backend.sparse_kernel(csr, blocks, np.zeros(blocks.packed_size,
                                                        dtype),
                                  weights, np.ones(len(blocks), dtype=bool))
            for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    for b, size in enumerate(blocks.sizes.tolist()):
        block = runs[0][blocks.offsets[b]:blocks.offsets[b + 1]]
        block = block.reshape(size, size)
        assert np.array_equal(block, block.T)


@pytest.mark.backends('emulated', 'cupy')
def test_table_budget_splits_the_blocks_into_groups(backend, rng):
    """A budget of position and row tables smaller than one block's tables
    runs every block as a group of its own: the same sums."""
    blocks = gappy_blocks(120)
    selected = np.ones(len(blocks), dtype=bool)
    groups = block_outer.launch_groups(blocks, selected, 40, table_bytes=1)
    assert len(groups) == len(blocks)
    assert (np.sum(groups, axis=0) == 1).all()
    assert len(block_outer.launch_groups(blocks, selected, 40)) == 1
    csr, dense = random_csr(rng, 40, 120, 0.3)
    weights = rng.random(40).astype(np.float32)
    launch = backend.launcher(block_outer.CUDA_SOURCE,
                              block_outer.CUDA_NAME_EXPRESSIONS)
    sums = []
    for table_bytes in (1, block_outer.TABLE_BYTES):
        G = backend.xp.zeros(blocks.packed_size)
        block_outer.sparse_launch(launch, backend.csr(csr), blocks, G,
                                  backend.array(weights), selected,
                                  table_bytes)
        sums.append(backend.host(G))
    assert np.array_equal(sums[0], sums[1])
    np.testing.assert_allclose(sums[0], oracle(dense, blocks, weights),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.backends('emulated')
@pytest.mark.parametrize('density', [0.0, 0.05, 0.5])
def test_positions_and_strip_rows_match_oracle(backend, rng, density):
    """The O(nnz) pass and the row lists of block_outer.cu: for every strip
    (TILE columns of a selected block) and row, the entries of the row in
    the strip, and the rows that have any, ascending, as NumPy finds them;
    gappy blocks, one left out, an empty row."""
    blocks = gappy_blocks(120)
    selected = np.array([True, True, True, True, False, True])
    csr, dense = random_csr(rng, 13, 120, density, empty_rows=[4])
    at_most, strip_first, strip_boundary = block_outer.strip_plan(blocks,
                                                                  selected)
    ids = np.flatnonzero(selected)
    boundaries = sorted({int(blocks.starts[b]) + t for b in ids
                         for t in range(0, int(blocks.sizes[b]), CUDA_TILE)}
                        | {int(blocks.starts[b] + blocks.sizes[b]) for b in ids})
    np.testing.assert_array_equal(
        at_most, [sum(x <= c for x in boundaries) for c in range(120)])
    n_boundaries = len(boundaries)
    assert block_outer.boundary_count(strip_boundary) == n_boundaries
    launch = backend.launcher(block_outer.CUDA_SOURCE,
                              block_outer.CUDA_NAME_EXPRESSIONS)
    pos = np.full(n_boundaries * 13, -1, dtype=np.int32)
    launch('block_outer_positions', (13,), (32,), 0,
           (csr.indptr, csr.indices, np.int64(13), at_most,
            np.int32(n_boundaries), pos))
    rows_of = np.full(len(strip_boundary) * 13, -1, dtype=np.int32)
    count = np.full(len(strip_boundary), -1, dtype=np.int32)
    launch('block_outer_rows', (len(strip_boundary),), (32,), 0,
           (pos, np.int64(13), strip_boundary, rows_of, count))
    pos = pos.reshape(n_boundaries, 13)
    for b in np.flatnonzero(selected):
        start, size = int(blocks.starts[b]), int(blocks.sizes[b])
        for t in range(-(-size // block_outer.CUDA_TILE)):
            s = strip_first[b] + t
            first = start + t * block_outer.CUDA_TILE
            stop = min(first + block_outer.CUDA_TILE, start + size)
            k = strip_boundary[s]
            for i in range(13):
                row = csr.indices[csr.indptr[i]:csr.indptr[i + 1]]
                assert pos[k, i] == np.searchsorted(row, first)
                assert pos[k + 1, i] == np.searchsorted(row, stop)
            touching = np.flatnonzero((dense[:, first:stop] != 0).any(axis=1))
            assert count[s] == len(touching)
            np.testing.assert_array_equal(rows_of[s * 13:s * 13 + count[s]],
                                          touching)


@pytest.mark.parametrize('dtype', [np.float64, np.float16, np.int32])
def test_weights_must_be_float32(rng, dtype):
    """No silent cast (issue #20): float64 weights would be rounded."""
    csr, _ = random_csr(rng, 4, 10, 0.5)
    blocks = Blocks.contiguous([4, 6])
    with pytest.raises(GradnetError, match=f'weights must be float32, got '
                       f'{np.dtype(dtype).name}: convert explicitly'):
        block_outer_accumulate(csr, blocks, np.zeros(blocks.packed_size),
                               np.ones(4, dtype=dtype))


def test_validation_is_one_host_read_and_optional(rng, monkeypatch):
    """check_csr reads its flags back once; validate=False skips the
    contents (not the layout) and gives the same sums."""
    from gradnet_cupy.kernels import csr as csr_module

    csr, dense = random_csr(rng, 20, 60, 0.3)
    blocks = Blocks.contiguous([20, 40])
    reads = []

    def counting(array):
        reads.append(array)
        return np.asarray(array)
    monkeypatch.setattr(csr_module, 'to_numpy', counting)
    sums = []
    for validate in (True, False):
        G = np.zeros(blocks.packed_size)
        block_outer_accumulate(csr, blocks, G, validate=validate)
        sums.append(G)
    assert len(reads) == 1 and reads[0].shape == (3,)
    assert np.array_equal(sums[0], sums[1])
    np.testing.assert_allclose(sums[0], oracle(dense, blocks), rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(GradnetError, match='data must be float32'):
        block_outer_accumulate(csr._replace(data=csr.data.astype(np.float64)),
                               blocks, G, validate=False)


def test_tile_list_covers_upper_triangles():
    blocks = tile_blocks()
    block, row, col = tile_list(blocks, np.ones(len(blocks), dtype=bool))
    per_side = -(-blocks.sizes // CUDA_TILE)          # 1, 1, 2, 3, 1
    assert np.bincount(block).tolist() == (per_side * (per_side + 1) // 2
                                           ).tolist()
    assert (row <= col).all() and (col < per_side[block]).all()
    assert len(set(zip(block, row, col))) == len(block)


@pytest.mark.parametrize('method, constant, limit', [
    ('sparse', 'PAIR_CHUNK', 50), ('dense', 'DENSE_CHUNK', 650)])
def test_paths_work_in_chunks(rng, monkeypatch, method, constant, limit):
    """Tiny chunk limits: the reference forms pairs for a few runs at a
    time, the dense path zero-fills two blocks at a time."""
    csr, dense = random_csr(rng, 30, 100, 0.4)
    blocks = Blocks.contiguous([7, 43, 10, 10, 10, 10, 10])
    monkeypatch.setattr(block_outer, constant, limit)
    G = np.zeros(blocks.packed_size)
    block_outer_accumulate(csr, blocks, G, method=method)
    np.testing.assert_allclose(G, oracle(dense, blocks), rtol=1e-12,
                               atol=1e-12)


def test_auto_splits_blocks_by_crossover(rng, monkeypatch):
    """Blocks at or above the crossover density go dense, the rest sparse;
    the result is the oracle's either way."""
    rows = 50
    dense = np.zeros((rows, 96), dtype=np.float32)
    dense[:, :32] = rng.standard_normal((rows, 32))           # density 1
    sparse_part = rng.standard_normal((rows, 64))
    sparse_part[rng.random((rows, 64)) >= 0.05] = 0
    dense[:, 32:] = sparse_part
    csr = csr_from_dense(dense)
    blocks = Blocks.contiguous([32, 64])
    table = {'numpy': {'block_sizes': [16, 128],
                       'crossover_density': [0.5, 0.5]}}
    monkeypatch.setattr(block_outer, 'load_crossovers', lambda: table)
    counts = np.array([np.count_nonzero(dense[:, :32]),
                       np.count_nonzero(dense[:, 32:])])
    chosen = block_outer.choose_dense(counts, blocks.sizes, rows, np)
    assert chosen.tolist() == [True, False]
    calls = []
    for name in ('_dense', '_sparse_reference'):
        original = getattr(block_outer, name)

        def spy(entries, blocks_, G, w, selected, *rest, _o=original, _n=name):
            calls.append((_n, np.flatnonzero(selected).tolist()))
            return _o(entries, blocks_, G, w, selected, *rest)
        monkeypatch.setattr(block_outer, name, spy)
    G = np.zeros(blocks.packed_size)
    block_outer_accumulate(csr, blocks, G)
    assert sorted(calls) == [('_dense', [0]), ('_sparse_reference', [1])]
    np.testing.assert_allclose(G, oracle(dense.astype(np.float64), blocks),
                               rtol=1e-12, atol=1e-12)


def test_crossover_interpolates_in_log_size():
    table = {'cupy': {'block_sizes': [64, 256, 4096],
                      'crossover_density': [0.4, 0.2, 0.1]}}
    got = block_outer.crossover_density('cupy', [16, 64, 128, 256, 8192],
                                        table)
    np.testing.assert_allclose(got, [0.4, 0.4, 0.3, 0.2, 0.1])


def test_packaged_crossovers_cover_both_backends():
    table = block_outer.load_crossovers()
    for backend in ('numpy', 'cupy'):
        entry = table[backend]
        assert len(entry['block_sizes']) == len(entry['crossover_density'])
        density = block_outer.crossover_density(backend, [64, 1024, 4096])
        assert ((density >= 0) & (density <= 1.01)).all()


def test_blocks_offsets_and_split():
    blocks = Blocks([2, 10], [3, 7], 20)
    assert blocks.offsets.tolist() == [0, 9, 58]
    assert blocks.packed_size == 58 and blocks.covered == 10
    split = blocks.split(3)
    assert split.starts.tolist() == [2, 10, 13, 15]
    assert split.sizes.tolist() == [3, 3, 2, 2]
    assert blocks.column_block(np.array([0, 2, 4, 5, 9, 16, 17])).tolist() \
        == [-1, 0, 0, -1, -1, 1, -1]


@pytest.mark.parametrize('starts, sizes, n, message', [
    ([0, 4], [5, 3], 10, 'overlap'),
    ([4, 0], [2, 2], 10, 'ascending'),
    ([8], [3], 10, 'out of range'),
    ([-1], [3], 10, 'out of range'),
    ([0], [0], 10, 'size >= 1'),
    ([0, 1], [1], 10, '1-D of one length'),
    ([0.5], [1], 10, 'integers'),
])
def test_blocks_validation(starts, sizes, n, message):
    with pytest.raises(GradnetError, match=message):
        Blocks(starts, sizes, n)


def test_input_validation(rng):
    csr, _ = random_csr(rng, 4, 10, 0.5)
    blocks = Blocks.contiguous([4, 6])
    G = np.zeros(blocks.packed_size)
    cases = [
        (dict(blocks=Blocks.contiguous([4, 5])), '9 columns'),
        (dict(G=np.zeros(5)), 'contiguous array of shape'),
        (dict(G=np.zeros(2 * blocks.packed_size)[::2]), 'contiguous'),
        (dict(G=np.zeros(blocks.packed_size, dtype=np.int64)), 'float32 or'),
        (dict(weights=np.ones(3)), r'weights must have shape \(4,\)'),
        (dict(method='fast'), 'unknown method'),
        (dict(csr=csr._replace(indices=csr.indices[::-1].copy())),
         'strictly increasing'),
        (dict(csr=csr._replace(indices=csr.indices + 10)), 'out of range'),
        (dict(csr=csr._replace(data=csr.data.astype(np.float64))),
         'data must be float32'),
        (dict(csr=csr._replace(indptr=csr.indptr[::-1].copy())),
         'indptr must rise'),
    ]
    for change, message in cases:
        args = dict(csr=csr, blocks=blocks, G=G, weights=None,
                    method='auto')
        args.update(change)
        with pytest.raises(GradnetError, match=message):
            block_outer_accumulate(**args)
