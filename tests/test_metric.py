"""BlockMetric (NumPy) against dense NumPy/SciPy oracles."""
import numpy as np
import pytest
import scipy.linalg

from block_outer_cases import csr_from_dense, gappy_blocks, random_csr
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import Blocks
from gradnet_cupy.metric import (BlockMetric, layout_blocks,
                                 packed_size_with_cap)
from gradnet_cupy.metric import block_metric as block_metric_module
from gradnet_cupy.tangent import ParameterEntry, ParameterLayout


def entry(path, shape, offset):
    """A ParameterEntry: parameter 'W' of the link ``path``."""
    return ParameterEntry(path, 'W', shape, offset, int(np.prod(shape)),
                          'Link')


def layout_of(*shapes):
    """A ParameterLayout of one parameter per link, in order."""
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    return ParameterLayout(tuple(entry(f'/l{i}', shape, int(offset))
                                 for i, (shape, offset)
                                 in enumerate(zip(shapes, offsets))))


# a conv filter bank (4 filters of 3 x 2 x 2), a bias (4), a Linear (5 x 8),
# each its own link (offsets 0, 48, 52)
LAYOUT = layout_of((4, 3, 2, 2), (4,), (5, 8))
N = 92


def block_list(blocks):
    return list(zip(blocks.starts.tolist(), blocks.sizes.tolist()))


def test_partitions_of_a_layout():
    blocks, segments = layout_blocks(LAYOUT, 'per_layer')
    assert block_list(blocks) == [(0, 48), (48, 4), (52, 40)]
    assert segments.tolist() == [48, 4, 40] and blocks.n_columns == N
    blocks, _ = layout_blocks(LAYOUT, 'per_unit')
    assert block_list(blocks) == ([(12 * u, 12) for u in range(4)]
                                  + [(48, 4)]
                                  + [(52 + 8 * u, 8) for u in range(5)])
    blocks, _ = layout_blocks(LAYOUT, 'per_layer', max_block=20)
    assert block_list(blocks) == [(0, 16), (16, 16), (32, 16), (48, 4),
                                  (52, 20), (72, 20)]
    blocks, _ = layout_blocks(LAYOUT, 'diagonal')
    assert block_list(blocks) == [(c, 1) for c in range(N)]


@pytest.mark.parametrize('layout, partition, max_block, message', [
    (ParameterLayout((entry('/a', (4, 3), 0), entry('/b', (2,), 13))),
     'per_layer', None, 'expected offset 12'),
    (layout_of((4, 0)), 'per_layer', None, 'size >= 1'),
    (layout_of(), 'per_layer', None, 'empty'),
    (LAYOUT, 'per_neuron', None, 'unknown partition'),
    (LAYOUT, 'per_unit', 0, 'maximum block size must be >= 1'),
])
def test_layout_validation(layout, partition, max_block, message):
    with pytest.raises(GradnetError, match=message):
        layout_blocks(layout, partition, max_block)


def oracle_mean(dense, weights):
    w = weights.astype(np.float64)
    return dense.T @ (dense * w[:, None]) / w.sum()


def test_finalize_whitens_damped_blocks(rng):
    """(G_b + lambda_b I)^{-1/2} (G_b + lambda_b I) (G_b + lambda_b I)^{-1/2}
    = I per block, with G_b the oracle's weighted mean."""
    # fewer rows than the largest block: G_b is singular, damping decides
    csr, dense = random_csr(rng, 30, N, 0.4, empty_rows=[2])
    weights = rng.random(30).astype(np.float32) + 0.1
    metric = BlockMetric.from_layout(LAYOUT, 'per_layer')
    metric.accumulate(csr, weights).finalize(damping=1e-2)
    mean = oracle_mean(dense, weights)
    roots = metric.inverse_sqrt()
    blocks = metric.blocks
    assert metric.weight_sum == pytest.approx(weights.sum(), rel=1e-6)
    for b, (start, size) in enumerate(block_list(blocks)):
        G_b = mean[start:start + size, start:start + size]
        lam = 1e-2 * np.trace(G_b) / size
        assert metric.damping[b] == pytest.approx(lam, rel=1e-9)
        damped = G_b + lam * np.eye(size)
        root = roots[blocks.offsets[b]:blocks.offsets[b + 1]].reshape(
            size, size).astype(np.float64)
        np.testing.assert_allclose(root @ damped @ root, np.eye(size),
                                   atol=2e-3)
        np.testing.assert_allclose(root, root.T, atol=1e-4 * abs(root).max())


def test_absolute_damping_and_untouched_blocks(rng):
    dense = np.zeros((10, 20), dtype=np.float32)
    dense[:, :8] = rng.standard_normal((10, 8))
    metric = BlockMetric(Blocks.contiguous([8, 12]))
    metric.accumulate(csr_from_dense(dense)).finalize(0.5, relative=False)
    assert metric.damping.tolist() == [0.5, 0.5]
    metric.finalize(0.5, relative=True)
    # block 1 saw no nonzero: lambda 1 and the identity
    assert metric.damping[1] == 1.0
    root = metric.inverse_sqrt()[64:].reshape(12, 12)
    np.testing.assert_allclose(root, np.eye(12), atol=1e-6)


def test_diagonal_variant(rng):
    csr, dense = random_csr(rng, 40, N, 0.3)
    weights = rng.random(40).astype(np.float32)
    metric = BlockMetric.from_layout(LAYOUT, 'diagonal')
    metric.accumulate(csr, weights).finalize(1e-3, relative=False)
    second_moment = (dense ** 2 * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(metric.inverse_sqrt(),
                               (second_moment + 1e-3) ** -0.5, rtol=1e-5)
    out = metric.apply(csr)
    # the diagonal variant keeps the sparsity pattern
    assert np.array_equal(out.indptr, csr.indptr)
    assert np.array_equal(out.indices, csr.indices)
    np.testing.assert_allclose(out.to_scipy().toarray(),
                               dense * (second_moment + 1e-3) ** -0.5,
                               rtol=1e-5)


def whitening_oracle(dense, blocks, mean, damping):
    """Dense rows whitened block by block with SciPy's matrix square root;
    columns outside the blocks unchanged."""
    out = dense.copy()
    for b, (start, size) in enumerate(block_list(blocks)):
        part = slice(start, start + size)
        damped = mean[part, part] + damping[b] * np.eye(size)
        root = np.linalg.inv(scipy.linalg.sqrtm(damped).real)
        out[:, part] = dense[:, part] @ root
    return out


def test_apply_matches_oracle(rng):
    train, train_dense = random_csr(rng, 80, 130, 0.3)
    blocks = gappy_blocks(130)
    metric = BlockMetric(blocks)
    metric.accumulate(train).finalize(1e-2)
    test, test_dense = random_csr(rng, 25, 130, 0.3, empty_rows=[4])
    test_dense[7, 8:25] = 0        # a row with nothing in block 3
    test = csr_from_dense(test_dense)
    expected = whitening_oracle(test_dense, blocks,
                                oracle_mean(train_dense, np.ones(80)),
                                metric.damping)
    out = metric.apply(test)
    got = out.to_scipy().toarray()
    np.testing.assert_allclose(got, expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
    assert out.data.dtype == np.float32 and out.indices.dtype == np.int32
    assert np.count_nonzero(got[4]) == 0
    assert np.count_nonzero(got[7, 8:25]) == 0
    assert np.array_equal(np.flatnonzero(got), np.flatnonzero(expected))


def dense_inverse_sqrt(metric):
    """The block-diagonal (n, n) float64 matrix of the packed roots."""
    packed = metric.inverse_sqrt().astype(np.float64)
    dense = np.zeros((metric.blocks.n_columns,) * 2)
    for start, size, offset in zip(metric.blocks.starts, metric.blocks.sizes,
                                   metric.blocks.offsets):
        dense[start:start + size, start:start + size] = \
            packed[offset:offset + size * size].reshape(size, size)
    return dense


def test_apply_in_row_chunks(rng, monkeypatch):
    """Whitening a batch in 4-row chunks agrees with one pass to float32
    rounding: the BLAS may sum a block's s products in another order for
    another row count, and each result lies within gamma_s * sum_j |R_ij
    t_j| of the exact one (gamma_s = s u / (1 - s u), u = 2^-24), so the two
    differ by at most twice that (apply's documented promise)."""
    train, _ = random_csr(rng, 50, N, 0.3)
    metric = BlockMetric.from_layout(LAYOUT, 'per_unit')
    metric.accumulate(train).finalize()
    test, test_dense = random_csr(rng, 21, N, 0.3, empty_rows=[0, 20])
    whole = metric.apply(test).to_scipy().toarray()
    monkeypatch.setattr(block_metric_module, 'WORK_CHUNK', 4 * N)
    chunked = metric.apply(test)
    assert chunked.shape == (21, N)
    unit = np.finfo(np.float32).eps / 2
    s = int(metric.blocks.sizes.max())
    gamma = s * unit / (1 - s * unit)
    bound = 2 * gamma * (np.abs(test_dense.astype(np.float64))
                         @ np.abs(dense_inverse_sqrt(metric)).T)
    difference = np.abs(chunked.to_scipy().toarray().astype(np.float64)
                        - whole)
    assert (difference <= bound).all(), difference.max()
    assert np.count_nonzero(whole[[0, 20]]) == 0
    assert np.count_nonzero(chunked.to_scipy().toarray()[[0, 20]]) == 0
    assert metric.apply(csr_from_dense(np.zeros((0, N)))).shape == (0, N)


def test_batches_equal_one_batch(rng):
    csr, dense = random_csr(rng, 60, N, 0.3)
    weights = rng.random(60).astype(np.float32)
    one = BlockMetric.from_layout(LAYOUT, 'per_unit').accumulate(csr, weights)
    batches = [(csr_from_dense(dense[:20]), weights[:20]),
               (csr_from_dense(dense[20:45]), weights[20:45]),
               (csr_from_dense(dense[45:]), weights[45:])]
    several = BlockMetric.from_layout(LAYOUT, 'per_unit')
    several.accumulate_batches(batches, method='dense')
    np.testing.assert_allclose(several.G, one.G, rtol=1e-10, atol=1e-12)
    assert several.weight_sum == pytest.approx(one.weight_sum, rel=1e-6)
    unweighted = BlockMetric.from_layout(LAYOUT, 'per_unit')
    unweighted.accumulate_batches(batch for batch, _ in batches)
    assert unweighted.weight_sum == 60


def test_save_load_round_trip(rng, tmp_path):
    csr, _ = random_csr(rng, 40, N, 0.3)
    metric = BlockMetric.from_layout(LAYOUT, 'per_unit', max_block=6)
    metric.accumulate(csr)
    metric.save(tmp_path / 'raw.h5')
    raw = BlockMetric.load(tmp_path / 'raw.h5')
    assert not raw.finalized and raw.blocks == metric.blocks
    np.testing.assert_array_equal(raw.G, metric.G)
    metric.finalize(1e-2)
    metric.save(tmp_path / 'final.h5')
    loaded = BlockMetric.load(tmp_path / 'final.h5')
    assert loaded.weight_sum == metric.weight_sum
    np.testing.assert_array_equal(loaded.segment_sizes, [48, 4, 40])
    np.testing.assert_array_equal(loaded.damping, metric.damping)
    np.testing.assert_array_equal(loaded.inverse_sqrt(),
                                  metric.inverse_sqrt())
    test, _ = random_csr(rng, 5, N, 0.3)
    np.testing.assert_array_equal(loaded.apply(test).to_scipy().toarray(),
                                  metric.apply(test).to_scipy().toarray())


def test_load_refuses_other_files(tmp_path):
    import h5py

    with h5py.File(tmp_path / 'other.h5', 'w') as f:
        f['x'] = np.zeros(3)
    with pytest.raises(GradnetError, match='is not a gradnet-cupy block'):
        BlockMetric.load(tmp_path / 'other.h5')
    (tmp_path / 'text.h5').write_text('not hdf5')
    with pytest.raises(GradnetError, match='cannot open metric file'):
        BlockMetric.load(tmp_path / 'text.h5')


def test_memory_budget_names_what_fits():
    layout = layout_of((3000,), (10, 100))
    blocks, _ = layout_blocks(layout, 'per_layer', max_block=None)
    need = (3000 ** 2 + 1000 ** 2) * 12
    budget = 2_000_000
    with pytest.raises(GradnetError) as error:
        BlockMetric.from_layout(layout, 'per_layer', max_block=None,
                                max_bytes=budget)
    message = str(error.value)
    assert f'{need / 2 ** 20:.1f} MiB' in message
    cap = int(message.split('max_block=')[1].split()[0])
    assert packed_size_with_cap(blocks.sizes, cap) * 12 <= budget
    assert packed_size_with_cap(blocks.sizes, cap + 1) * 12 > budget
    assert BlockMetric.from_layout(layout, 'per_layer', max_block=cap,
                                   max_bytes=budget).blocks.sizes.max() <= cap
    assert 'diagonal partition (46.9 KiB)' in message
    with pytest.raises(GradnetError, match='not even the diagonal'):
        BlockMetric.from_layout(layout, 'diagonal', max_bytes=1000)


def test_packed_size_with_cap_matches_split():
    blocks = Blocks.contiguous([1, 7, 100, 33])
    for cap in (1, 2, 6, 7, 50, 100, 200):
        assert packed_size_with_cap(blocks.sizes, cap) == \
            blocks.split(cap).packed_size


def test_misuse_is_refused(rng):
    metric = BlockMetric.from_layout(LAYOUT, 'per_layer', max_block=None)
    csr, _ = random_csr(rng, 3, N, 0.5)
    with pytest.raises(GradnetError, match='not finalized'):
        metric.apply(csr)
    with pytest.raises(GradnetError, match='no rows'):
        metric.finalize()
    metric.accumulate(csr)
    with pytest.raises(GradnetError, match='damping must be > 0'):
        metric.finalize(0.0)
    metric.finalize()
    wrong, _ = random_csr(rng, 3, N + 1, 0.5)
    with pytest.raises(GradnetError, match='93 columns'):
        metric.apply(wrong)
    with pytest.raises(GradnetError, match='segment sizes'):
        BlockMetric(metric.blocks, [N - 1])


def test_apply_resparsifies_per_layer(rng):
    """apply(csr, q): the whitened rows keep, per row and layer segment, the
    entries above the q-th percentile of their magnitudes (docs/method.rst#per-layer-sparsification)."""
    train, _ = random_csr(rng, 60, N, 0.3)
    metric = BlockMetric.from_layout(LAYOUT, 'per_unit')
    metric.accumulate(train).finalize()
    test, _ = random_csr(rng, 12, N, 0.3, empty_rows=[5])
    whitened = metric.apply(test).to_scipy().toarray()
    expected = np.zeros_like(whitened)
    for start, size in [(0, 48), (48, 4), (52, 40)]:
        part = whitened[:, start:start + size]
        threshold = np.percentile(np.abs(part).astype(np.float64), 70,
                                  axis=1)
        keep = np.abs(part) > threshold[:, None]
        expected[:, start:start + size] = np.where(keep, part, 0)
    got = metric.apply(test, q=70)
    np.testing.assert_array_equal(got.to_scipy().toarray(), expected)
    assert got.nnz < 0.4 * np.count_nonzero(whitened)
