import json
import os

import numpy as np
import pytest
import scipy.sparse
from click.testing import CliRunner

from sparsify_cases import kept_oracle

from gradnet_cupy.cli import main
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet import fit_stores
from gradnet_cupy.kernels import CSR
from gradnet_cupy.normalize import (COLUMN_METHODS, ColumnNormalizer,
                                    ColumnStats, load_normalizer)
from gradnet_cupy.options import (MetricOptions, NetOptions,
                                  NormalizeOptions, TrainOptions)
from gradnet_cupy.store import StoreWriter, TangentStore

BLOCKS = [6, 10, 4]


def fit(method, stats, block_sizes, power=0.5):
    return ColumnNormalizer.from_stats(stats, block_sizes,
                                       NormalizeOptions(method, power))


def make_csr(rng, rows, cols=20, density=0.4):
    m = scipy.sparse.random(rows, cols, density=density, format='csr',
                            random_state=np.random.RandomState(
                                rng.integers(1 << 30)), dtype=np.float32)
    m.data = rng.normal(size=m.nnz).astype(np.float32) * 3
    m.sort_indices()
    return CSR(m.indptr.astype(np.int64), m.indices.astype(np.int32),
               m.data, m.shape)


def csr_of(dense):
    m = scipy.sparse.csr_matrix(dense.astype(np.float32))
    m.sort_indices()
    return CSR(m.indptr.astype(np.int64), m.indices.astype(np.int32),
               m.data, m.shape)


def with_empty_and_constant_columns(csr, constant=0.5):
    """``csr`` with column 0 emptied and every nonzero of column 7 set to
    ``constant`` (column 7 keeps nonzeros in every other row): the two
    special columns the statistics and normalizers promise to handle."""
    dense = csr.to_scipy().toarray()
    dense[:, 0] = 0
    dense[::2, 7] = constant
    dense[1::2, 7] = 0
    return csr_of(dense)


def masked_column_oracle(dense):
    """Per-column stats of nonzeros, computed with a dense masked array."""
    masked = np.ma.masked_equal(dense.astype(np.float64), 0.0)
    return masked


def test_column_stats_match_masked_oracle(rng):
    a = with_empty_and_constant_columns(make_csr(rng, 15))
    b = with_empty_and_constant_columns(make_csr(rng, 9))
    stats = ColumnStats(20).add(a).add(b).as_dict()
    dense = np.vstack([a.to_scipy().toarray(), b.to_scipy().toarray()])
    m = masked_column_oracle(dense)
    np.testing.assert_array_equal(stats['count'], m.count(axis=0))
    # the empty column: no count, +inf/-inf bounds, zero sums
    assert stats['count'][0] == 0 and stats['sum'][0] == 0
    assert stats['min'][0] == np.inf and stats['max'][0] == -np.inf
    assert stats['min'][7] == stats['max'][7] == np.float32(0.5)
    seen = m.count(axis=0) > 0
    np.testing.assert_allclose(stats['min'][seen], m.min(axis=0)[seen])
    np.testing.assert_allclose(stats['max'][seen], m.max(axis=0)[seen])
    np.testing.assert_allclose(stats['sum'], m.sum(axis=0).filled(0))
    np.testing.assert_allclose(stats['sumsq'],
                               (m ** 2).sum(axis=0).filled(0))


def expected_dense(method, train, x, power=0.5):
    """Independent dense oracle of each method over the nonzero mask."""
    m = masked_column_oracle(train)
    mask = x != 0
    x = x.astype(np.float64)
    seen = (m.count(axis=0) > 0)
    if method in ('scale', 'scale_power'):
        low = m.min(axis=0).filled(0)
        span = (m.max(axis=0) - m.min(axis=0)).filled(0)
        span = np.where(seen & (span > 0), span, 1)
        y = (x - np.where(seen, low, 0)) / span
    elif method in ('standard', 'standard_l2'):
        mean = m.mean(axis=0).filled(0)
        std = m.std(axis=0).filled(0)
        y = (x - np.where(seen, mean, 0)) / np.where(seen & (std > 0), std, 1)
    else:
        y = x.copy()
    if method == 'scale_power':
        power = 0.5
    if method in ('power', 'scale_power'):
        y = np.sign(y) * np.abs(y) ** power
    if method == 'standard_l2':
        start = 0
        for size in BLOCKS:
            part = np.where(mask[:, start:start + size],
                            y[:, start:start + size], 0)
            norm = np.sqrt((part ** 2).sum(axis=1, keepdims=True))
            y[:, start:start + size] = part / np.where(norm == 0, 1, norm)
            start += size
    return np.where(mask, y, 0)


@pytest.mark.parametrize('method', COLUMN_METHODS)
def test_methods_match_dense_oracle(rng, method):
    # training data with an empty column 0 and a constant column 7; the
    # test data has nonzeros in both (column 0 unseen in training)
    train = with_empty_and_constant_columns(make_csr(rng, 30))
    dense_test = make_csr(rng, 8).to_scipy().toarray()
    dense_test[:, 0] = np.linspace(-2, 2, 8) + 0.1
    dense_test[:, 7] = np.linspace(-1, 1, 8) + 0.05
    test = csr_of(dense_test)
    stats = ColumnStats(20).add(train).as_dict()
    norm = fit(method, stats, BLOCKS, power=0.25)
    out = norm(test)
    assert out.data.dtype == np.float32
    np.testing.assert_array_equal(out.indices, test.indices)
    np.testing.assert_array_equal(out.indptr, test.indptr)
    dense_out = np.zeros(test.shape)
    for r in range(test.shape[0]):
        lo, hi = test.indptr[r], test.indptr[r + 1]
        dense_out[r, test.indices[lo:hi]] = out.data[lo:hi]
    want = expected_dense(method, train.to_scipy().toarray(),
                          test.to_scipy().toarray(), power=0.25)
    np.testing.assert_allclose(dense_out, want, rtol=1e-5, atol=1e-6)


def test_statistics_come_from_training_data_only(rng):
    train, test = make_csr(rng, 30), make_csr(rng, 8)
    on_train = fit('scale', ColumnStats(20).add(train).as_dict(), BLOCKS)
    on_test = fit('scale', ColumnStats(20).add(test).as_dict(), BLOCKS)
    assert not np.allclose(on_train(test).data, on_test(test).data)


def test_state_round_trip(tmp_path, rng):
    train, test = make_csr(rng, 30), make_csr(rng, 8)
    norm = fit('standard_l2', ColumnStats(20).add(train).as_dict(), BLOCKS)
    norm.save(tmp_path)
    loaded = load_normalizer(tmp_path)
    assert loaded.method == 'standard_l2'
    np.testing.assert_array_equal(loaded(test).data, norm(test).data)


def test_bad_arguments_are_named(rng):
    stats = ColumnStats(20).add(make_csr(rng, 5)).as_dict()
    with pytest.raises(GradnetError, match='unknown normalization'):
        fit('zscore', stats, BLOCKS)
    with pytest.raises(GradnetError, match='power'):
        fit('power', stats, BLOCKS, power=-1)
    with pytest.raises(GradnetError, match='block sizes'):
        fit('scale', stats, [5, 5])
    with pytest.raises(GradnetError, match='columns'):
        ColumnStats(21).add(make_csr(rng, 3))


# ------------------------------------- fitted on another split's store --

# two layer blocks: a Linear 3x4 with bias (15 columns), a Linear 2x3 (6)
SPLIT_LAYOUT = {'entries': [
    {'path': '/fc1', 'name': 'W', 'shape': [3, 4], 'offset': 0, 'size': 12,
     'link_type': 'Linear'},
    {'path': '/fc1', 'name': 'b', 'shape': [3], 'offset': 12, 'size': 3,
     'link_type': 'Linear'},
    {'path': '/fc2', 'name': 'W', 'shape': [2, 3], 'offset': 15, 'size': 6,
     'link_type': 'Linear'}], 'block_sizes': [15, 6]}
SPLIT_COLUMNS = 21
SPLIT_CLASSES = 2


def write_split_store(path, dense, candidates, model='ab', q=85.0):
    """A finalized store of the rows ``dense`` (float32, rows x 21): one
    row per sample (``candidates='random'``) or SPLIT_CLASSES consecutive
    rows per sample (``'all'``), sample targets alternating 0/1."""
    per = SPLIT_CLASSES if candidates == 'all' else 1
    rows = np.arange(len(dense))
    provenance = {'model_sha256': model * 32, 'arch': 'mlp',
                  'dataset': 'mnist', 'q': q, 'n_classes': SPLIT_CLASSES,
                  'candidates': candidates, 'seed': 0}
    writer = StoreWriter.create(path, SPLIT_COLUMNS, SPLIT_LAYOUT,
                                provenance, total_rows=len(dense))
    writer.append(csr_of(dense), rows // per, rows % per,
                  (rows // per) % SPLIT_CLASSES)
    return str(writer.finalize())


@pytest.fixture
def split_stores(tmp_path):
    """train.h5 and validation.h5 (random candidates; validation values 10x
    larger and shifted, so the two splits' statistics differ in every
    column), test.h5 (all candidates), and other.h5 (another snapshot)."""
    rng = np.random.default_rng(7)

    def rows(n, scale, shift):
        dense = rng.normal(shift, scale, (n, SPLIT_COLUMNS))
        dense[rng.random(dense.shape) < 0.3] = 0
        return dense.astype(np.float32)

    return {'train': write_split_store(tmp_path / 'train.h5', rows(30, 1, 0),
                                       'random'),
            'validation': write_split_store(tmp_path / 'validation.h5',
                                            rows(20, 10, 3), 'random'),
            'test': write_split_store(tmp_path / 'test.h5', rows(16, 1, 0),
                                      'all'),
            'other': write_split_store(tmp_path / 'other.h5', rows(20, 1, 0),
                                       'random', model='cd')}


def store_dense(path):
    """Every row of the store at ``path``, dense."""
    with TangentStore.open(path) as store:
        return np.vstack([b.csr.to_scipy().toarray()
                          for b in store.iter_batches(64)])


@pytest.mark.parametrize('which', ['train', 'validation'])
def test_scale_power_is_fitted_on_the_named_store(split_stores, which):
    """fit_stores with ``fit_store``: the normalizer's offsets and divisors
    are the min and range of the nonzeros of that store's rows (a masked
    NumPy oracle), not of the training rows'."""
    fit_store = None if which == 'train' else split_stores[which]
    _, normalizer, _ = fit_stores(
        split_stores['train'], split_stores['test'],
        NormalizeOptions('scale_power', fit_store=fit_store),
        NetOptions(hidden=(2, 2)), TrainOptions(epochs=1, eval_every=0),
        'cpu', progress=False)
    masked = masked_column_oracle(store_dense(split_stores[which]))
    np.testing.assert_allclose(normalizer.offset, masked.min(axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(
        normalizer.divisor, masked.max(axis=0) - masked.min(axis=0),
        rtol=1e-5)


def floored_scale(fit_rows, damping, segments=(15, 6)):
    """Oracle of the diagonal metric's column factor: ``((M_jj + damping
    * mean of M over j's layer segment) (1 + damping))^{-1/2}`` with
    ``M_jj`` the mean of ``t_j^2`` over ``fit_rows`` (float64)."""
    second = (fit_rows.astype(np.float64) ** 2).mean(axis=0)
    floor = np.concatenate([np.full(n, part.mean()) for n, part in zip(
        segments, np.split(second, np.cumsum(segments)[:-1]))])
    return ((second + damping * floor) * (1 + damping)) ** -0.5


def fit_diagonal(split_stores, damping, fit_store):
    """The metric normalizer (diagonal partition) of fit_stores on the
    train and test stores, fitted on ``fit_store``."""
    _, normalizer, _ = fit_stores(
        split_stores['train'], split_stores['test'],
        NormalizeOptions('metric', metric=MetricOptions(
            partition='diagonal', damping=damping), fit_store=fit_store),
        NetOptions(hidden=(2, 2)), TrainOptions(epochs=1, eval_every=0),
        'cpu', progress=False)
    return normalizer


def test_diagonal_metric_is_fitted_on_the_named_store(split_stores):
    """``metric`` with the diagonal partition fitted on the validation
    store: a training row becomes ``t_j`` times :func:`floored_scale` of
    the *validation* rows, then re-sparsified per layer block at the
    store's q (dense oracle)."""
    damping = 0.01
    normalizer = fit_diagonal(split_stores, damping,
                              split_stores['validation'])
    validation = store_dense(split_stores['validation'])
    train = store_dense(split_stores['train'])
    want = kept_oracle(train * floored_scale(validation, damping), 85.0,
                       [15, 6])
    got = normalizer(csr_of(train)).to_scipy().toarray()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    on_train = kept_oracle(train * floored_scale(train, damping), 85.0,
                           [15, 6])
    assert not np.allclose(got, on_train, rtol=1e-2)


def test_diagonal_metric_floors_a_rarely_kept_column(split_stores,
                                                     tmp_path):
    """A column that the fitting rows keep once, tiny, gets the layer's
    floor, not ``1 / sqrt(M_jj)``: its factor is at most ``(damping *
    layer mean)^{-1/2}`` and equals the oracle (without the floor it
    would be about 4.5e4 and GradNet's inputs blow up)."""
    damping = 1e-3
    rare = store_dense(split_stores['validation'])
    rare[:, 3] = 0
    rare[0, 3] = 1e-4
    path = write_split_store(tmp_path / 'rare.h5', rare, 'random')
    normalizer = fit_diagonal(split_stores, damping, path)
    scale = normalizer.metric.inverse_sqrt()     # one 1 x 1 block a column
    want = floored_scale(rare, damping)
    np.testing.assert_allclose(scale, want, rtol=1e-5)
    layer_mean = (rare[:, :15].astype(np.float64) ** 2).mean()
    assert scale[3] <= (damping * layer_mean) ** -0.5
    assert scale[3] < 100 * np.median(scale[:15])


def test_cli_fit_normalize_store_and_mismatch(split_stores, tmp_path):
    """``fit --normalize-store``: the saved normalizer is the validation
    store's and gradnet.json records the store; a store of another
    snapshot is one error line and leaves no fit behind."""
    args = ['fit', '--train', split_stores['train'], '--test',
            split_stores['test'], '--hidden', '2,2', '--epochs', '1']
    result = CliRunner().invoke(main, args + [
        '--normalize-store', split_stores['validation'],
        '--out', str(tmp_path / 'gn')])
    assert result.exit_code == 0, result.output
    saved = load_normalizer(tmp_path / 'gn')
    masked = masked_column_oracle(store_dense(split_stores['validation']))
    np.testing.assert_allclose(saved.offset, masked.min(axis=0), rtol=1e-6)
    with open(tmp_path / 'gn' / 'gradnet.json') as f:
        settings = json.load(f)['settings']
    assert settings['normalize_store'] == split_stores['validation']
    result = CliRunner().invoke(main, args + [
        '--normalize-store', split_stores['other'],
        '--out', str(tmp_path / 'bad')])
    assert result.exit_code == 1
    line, = result.output.strip().splitlines()
    assert line.startswith('error: ') and 'other.h5' in line \
        and 'model_sha256' in line
    assert not [n for n in os.listdir(tmp_path) if n.startswith('bad')]
