"""The extraction stage and the extract/merge commands on real data (the
embedded MNIST digits) and a real base network."""
import json

import h5py
import numpy as np
import pytest
import scipy.sparse
from click.testing import CliRunner

from gradnet_cupy.cli import main
from gradnet_cupy.data import load_dataset
from gradnet_cupy import extract as extract_module
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.extract import (
    extract_to_store, parse_shard, shard_range)
from gradnet_cupy.metric import (BlockMetric, feature_blocks, feature_metric,
                                 store_identity, store_metric_path)
from gradnet_cupy.models import build_model
from gradnet_cupy.store import TangentStore
from gradnet_cupy.tangent import parameter_layout, tangent_features
from gradnet_cupy.tangent.engine import SUB_BATCH
from gradnet_cupy.train_base import save_snapshot

SUBSET = 12


@pytest.fixture(scope='module')
def mlp_snapshot(tmp_path_factory):
    data = load_dataset('mnist', subset=SUBSET)
    model = build_model('mlp', data.in_shape, data.n_classes, seed=3)
    path = tmp_path_factory.mktemp('base') / 'mlp.npz'
    save_snapshot(model, str(path))
    return str(path), model, data


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def extract_args(snapshot, out, *extra):
    return ('extract', '--model', snapshot, '--arch', 'mlp', '--subset',
            SUBSET, '--out', out, '--device', 'cpu', '--q', 90, *extra)


def oracle_rows(model, x, labels, candidates, q, sizes):
    """Dense tangent rows (tangent module) masked by np.percentile per row
    and layer, strict '>': the independent statement of §1 step 3."""
    g = tangent_features(model, x, labels, candidates).features
    out = np.zeros_like(g)
    start = 0
    for size in sizes:
        seg = g[:, start:start + size]
        for r in range(g.shape[0]):
            threshold = np.percentile(np.abs(seg[r]).astype(np.float64), q)
            keep = np.abs(seg[r]) > threshold
            out[r, start:start + size][keep] = seg[r][keep]
        start += size
    return out


def dying_after(iter_sparse_tangents, n_batches):
    """``iter_sparse_tangents`` interrupted (KeyboardInterrupt) after its
    first ``n_batches`` batches: a killed extraction."""
    def dying(*args, **kwargs):
        for i, batch in enumerate(iter_sparse_tangents(*args, **kwargs)):
            if i == n_batches:
                raise KeyboardInterrupt
            yield batch
    return dying


def test_extract_all_candidates_equals_oracle(tmp_path, mlp_snapshot):
    snapshot, model, data = mlp_snapshot
    out = tmp_path / 'test.h5'
    run(*extract_args(snapshot, out, '--split', 'test', '--candidates', 'all'))
    x, y = data.test
    with h5py.File(out, 'r') as f:   # plain h5py + scipy, no gradnet code
        group = f['X']
        matrix = scipy.sparse.csr_matrix(
            (group['data'][:], group['indices'][:], group['indptr'][:]),
            shape=tuple(group.attrs['shape']))
        sample, candidate = f['sample'][:], f['candidate'][:]
    assert matrix.shape[0] == SUBSET * 10
    np.testing.assert_array_equal(sample, np.repeat(np.arange(SUBSET), 10))
    np.testing.assert_array_equal(candidate, np.tile(np.arange(10), SUBSET))
    sizes = parameter_layout(model).block_sizes
    want = oracle_rows(model, x, y, 'all', 90, sizes)
    np.testing.assert_array_equal(matrix.toarray(), want)


def test_random_candidates_are_seeded_and_recorded(tmp_path, mlp_snapshot):
    snapshot, _, data = mlp_snapshot
    out = tmp_path / 'train.h5'
    run(*extract_args(snapshot, out, '--seed', 5))
    with TangentStore.open(out) as store:
        batch = store.read(0, len(store))
        provenance = store.provenance
    # the documented draw (one for the whole split from --seed), computed
    # here, not by the function under test
    expected = np.random.default_rng(5).integers(0, 10, SUBSET)
    np.testing.assert_array_equal(batch.candidate, expected)
    assert not np.array_equal(
        expected, np.random.default_rng(6).integers(0, 10, SUBSET))
    np.testing.assert_array_equal(batch.target, data.gradnet[1])
    assert provenance['q'] == 90 and provenance['candidates'] == 'random'
    assert provenance['n_classes'] == 10 and provenance['seed'] == 5
    assert provenance['batch'] == 64 and provenance['device'] == 'cpu'
    assert provenance['sub_batch'] == SUB_BATCH
    assert len(provenance['model_sha256']) == 64


def test_shards_merge_to_the_whole_extraction(tmp_path, mlp_snapshot):
    snapshot, _, _ = mlp_snapshot
    whole = tmp_path / 'whole.h5'
    run(*extract_args(snapshot, whole, '--batch', 2))
    shards = [tmp_path / f'part{i}.h5' for i in range(3)]
    for i, path in enumerate(shards):
        run(*extract_args(snapshot, path, '--shard', f'{i}/3', '--batch', 2))
    merged = tmp_path / 'merged.h5'
    run('merge', *shards, '--out', merged)
    with TangentStore.open(whole) as a, TangentStore.open(merged) as b:
        ra, rb = a.read(0, len(a)), b.read(0, len(b))
    assert (ra.csr.to_scipy() != rb.csr.to_scipy()).nnz == 0
    np.testing.assert_array_equal(ra.sample, rb.sample)
    np.testing.assert_array_equal(ra.candidate, rb.candidate)


def test_rerun_resumes_and_a_different_extraction_is_refused(
        tmp_path, mlp_snapshot, monkeypatch):
    snapshot, model, data = mlp_snapshot
    layout = parameter_layout(model)
    original = extract_module.iter_sparse_tangents

    def extract(out, q=90):
        return extract_to_store(model, layout, data.gradnet, 10, out,
                                {'dataset': 'mnist'}, q=q, batch=5,
                                progress=False)

    out = tmp_path / 'resumed.h5'
    monkeypatch.setattr(extract_module, 'iter_sparse_tangents',
                        dying_after(original, 1))
    with pytest.raises(KeyboardInterrupt):
        extract(out)
    monkeypatch.setattr(extract_module, 'iter_sparse_tangents', original)
    assert not out.exists()
    summary = extract(out)
    assert summary['resumed_from_rows'] == 5 and summary['rows'] == SUBSET
    uninterrupted = tmp_path / 'whole.h5'
    extract(uninterrupted)
    with TangentStore.open(out) as a, TangentStore.open(uninterrupted) as b:
        ra, rb = a.read(0, len(a)), b.read(0, len(b))
    assert (ra.csr.to_scipy() != rb.csr.to_scipy()).nnz == 0
    np.testing.assert_array_equal(ra.candidate, rb.candidate)
    assert extract(out)['resumed_from_rows'] == SUBSET
    with pytest.raises(GradnetError, match='differ'):
        extract(out, q=80)


def test_shard_arguments():
    assert parse_shard('1/4') == (1, 4)
    assert parse_shard(None) == (0, 1)
    for bad in ('4/4', 'a/b', '3'):
        with pytest.raises(GradnetError, match='shard'):
            parse_shard(bad)
    ranges = [shard_range(10, (i, 3), 2) for i in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(a % 2 == 0 for a, _ in ranges)


def test_extract_bad_q_is_a_one_line_error(tmp_path, mlp_snapshot):
    snapshot, _, _ = mlp_snapshot
    result = CliRunner().invoke(main, list(map(str, extract_args(
        snapshot, tmp_path / 'x.h5')))[:-2] + ['--q', '100'])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:')
    assert "'--q'" in lines[0] and '100' in lines[0]


def test_features_are_bit_identical_for_any_thread_count():
    # a convolutional base: the im2col GEMMs are where BLAS blocking and a
    # thread-dependent split of the batch changed the bits before
    data = load_dataset('mnist', subset=40)
    model = build_model('cnn', data.in_shape, data.n_classes, seed=1)
    x, y = data.test
    runs = [tangent_features(model, x, y, 'all', n_threads=n).features
            for n in (1, 2, 3)]
    assert runs[0].shape == (40 * 10, parameter_layout(model).n_params)
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


def test_resume_with_another_batch_is_refused(tmp_path, mlp_snapshot,
                                              monkeypatch):
    snapshot, model, data = mlp_snapshot
    layout = parameter_layout(model)
    original = extract_module.iter_sparse_tangents
    out = tmp_path / 'train.h5'

    def extract(batch):
        return extract_to_store(model, layout, data.gradnet, 10, out,
                                {'dataset': 'mnist'}, q=90, batch=batch,
                                progress=False)

    monkeypatch.setattr(extract_module, 'iter_sparse_tangents',
                        dying_after(original, 1))
    with pytest.raises(KeyboardInterrupt):
        extract(4)
    monkeypatch.setattr(extract_module, 'iter_sparse_tangents', original)
    # 4 rows done is a whole number of batches of 2, but batches of 2 give
    # other bits than batches of 4: refused, naming the reason
    with pytest.raises(GradnetError, match=r'batch: 4 \(expected 2\)'):
        extract(2)
    assert extract(4)['resumed_from_rows'] == 4


def test_an_empty_shard_is_refused(tmp_path, mlp_snapshot):
    _, model, data = mlp_snapshot
    # 12 samples in batches of 5 are 3 batches: the first of 4 shards of
    # them holds none (shard_range cuts at whole batches)
    assert shard_range(SUBSET, (0, 4), 5) == (0, 0)
    with pytest.raises(GradnetError, match='holds no samples'):
        extract_to_store(model, parameter_layout(model), data.gradnet, 10,
                         tmp_path / 's0.h5', {}, shard=(0, 4), batch=5,
                         progress=False)
    assert list(tmp_path.iterdir()) == []


def dense_block_sums(path, blocks):
    """Oracle of an accumulated metric: the store read with plain h5py +
    scipy, ``sum_i t_i[b] t_i[b]^T`` per block in float64 NumPy, packed."""
    with h5py.File(path, 'r') as f:
        group = f['X']
        rows = scipy.sparse.csr_matrix(
            (group['data'][:], group['indices'][:], group['indptr'][:]),
            shape=tuple(group.attrs['shape'])).toarray().astype(np.float64)
    return np.concatenate([
        (rows[:, s:s + n].T @ rows[:, s:s + n]).ravel()
        for s, n in zip(blocks.starts, blocks.sizes)]), len(rows)


def test_extract_accumulates_the_metric_of_every_row_across_a_resume(
        tmp_path, mlp_snapshot, monkeypatch):
    snapshot, model, data = mlp_snapshot
    layout = parameter_layout(model)
    original = extract_module.iter_sparse_tangents

    def extract():
        metric = feature_metric(layout, 'per_unit', max_block=16)
        return extract_to_store(model, layout, data.gradnet, 10, out,
                                {'dataset': 'mnist'}, q=90, batch=4,
                                progress=False, metric=metric)

    out = tmp_path / 'train.h5'
    monkeypatch.setattr(extract_module, 'iter_sparse_tangents',
                        dying_after(original, 2))
    with pytest.raises(KeyboardInterrupt):
        extract()
    monkeypatch.setattr(extract_module, 'iter_sparse_tangents', original)
    assert not store_metric_path(out).exists()
    summary = extract()
    assert summary['resumed_from_rows'] == 8
    assert summary['metric'] == str(tmp_path / 'train.metric.h5')
    metric = BlockMetric.load(summary['metric'])
    want, n_rows = dense_block_sums(out, metric.blocks)
    assert metric.weight_sum == n_rows == SUBSET
    np.testing.assert_allclose(metric.G, want, rtol=1e-5, atol=1e-12)
    with TangentStore.open(out) as store:
        assert metric.source == json.loads(json.dumps(store_identity(store)))


def test_extract_command_writes_the_metric_beside_the_store(
        tmp_path, mlp_snapshot):
    snapshot, model, _ = mlp_snapshot
    out = tmp_path / 'train.h5'
    result = run(*extract_args(snapshot, out, '--normalize', 'metric',
                               '--metric-partition', 'per_layer',
                               '--metric-max-block', 32))
    path = tmp_path / 'train.metric.h5'
    assert f'metric in {path}' in result.output
    metric = BlockMetric.load(path)
    assert metric.blocks == feature_blocks(parameter_layout(model),
                                           'per_layer', 32)
    want, _ = dense_block_sums(out, metric.blocks)
    np.testing.assert_allclose(metric.G, want, rtol=1e-5, atol=1e-12)
