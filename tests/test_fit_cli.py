"""fit / evaluate / online fit through the command line, on real digits
(the embedded MNIST) and real base networks."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from gradnet_cupy.cli import main
from gradnet_cupy.gradnet import (evaluate_candidates, load_gradnet,
                                  store_test_batches)
from gradnet_cupy.normalize import MetricNormalizer, TrainingFeatures
from gradnet_cupy.options import MetricOptions, NormalizeOptions
from gradnet_cupy.store import TangentStore
from gradnet_cupy.tangent import ParameterLayout

SUBSET = 60


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp('base')
    run('train-base', '--model', 'mlp', '--subset', SUBSET, '--epochs', 3,
        '--out', folder, '--device', 'cpu', '--json')
    return str(folder / 'snapshot_epoch_3.npz')


@pytest.fixture(scope='module')
def stores(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp('stores')
    common = ('--model', base, '--arch', 'mlp', '--subset', SUBSET,
              '--device', 'cpu', '--json')
    run('extract', '--split', 'gradnet', '--out', folder / 'train.h5',
        *common)
    run('extract', '--split', 'test', '--candidates', 'all', '--out',
        folder / 'test.h5', *common)
    return folder / 'train.h5', folder / 'test.h5'


def test_fit_saves_model_metrics_and_curve(stores, tmp_path):
    train, test = stores
    out = tmp_path / 'gn'
    result = run('fit', '--train', train, '--test', test, '--epochs', 2,
                 '--hidden', '3,4,2,1,1', '--out', out, '--json')
    summary = json.loads(result.output.strip().splitlines()[-1])
    info = json.loads((out / 'gradnet.json').read_text())
    assert [h['epoch'] for h in info['history']] == [1, 2]
    assert info['config']['hidden_sizes'] == [3, 4, 2, 1, 1]
    assert summary['test_accuracy'] == info['history'][-1]['test_accuracy']
    assert (out / 'learning_curve.png').read_bytes()[:4] == b'\x89PNG'
    # the saved model and normalizer reproduce the reported accuracy, read
    # in fit's own test batches: float32 outputs at another batch size agree
    # only to rounding, and a near-tie between two classes could flip
    model, normalizer, _ = load_gradnet(str(out))
    with TangentStore.open(test) as store:
        batches = list(store_test_batches(store, 'cpu'))
    accuracy, *_ = evaluate_candidates(model, batches, normalizer)
    assert accuracy == pytest.approx(summary['test_accuracy'])


def test_evaluate_prints_accuracy_and_confusion(stores, tmp_path):
    train, test = stores
    out = tmp_path / 'gn'
    run('fit', '--train', train, '--test', test, '--epochs', 1, '--out', out,
        '--normalize', 'standard_l2', '--wiring', 'adjacent', '--json')
    summary = json.loads(run('evaluate', '--gradnet', out, '--test', test,
                             '--json').output)
    confusion = np.array(summary['confusion'])
    assert confusion.shape == (10, 10) and confusion.sum() == SUBSET
    assert np.trace(confusion) / SUBSET == pytest.approx(
        summary['test_accuracy'])
    saved = json.loads((out / 'gradnet.json').read_text())
    assert summary['test_accuracy'] == pytest.approx(
        saved['summary']['test_accuracy'])


def test_fit_refuses_missing_inputs(tmp_path):
    result = CliRunner().invoke(main, ['fit', '--out', str(tmp_path / 'x')])
    assert result.exit_code == 1
    assert result.output.startswith('error:') and '--train' in result.output
    result = CliRunner().invoke(main, ['fit', '--online',
                                       '--out', str(tmp_path / 'x')])
    assert result.exit_code == 1 and '--model' in result.output


def test_online_fit_learns(base, tmp_path):
    """Algorithm 1 without a store: a weak base MLP's tangent features
    carry enough to classify the digits far above chance (0.1)."""
    out = tmp_path / 'online'
    result = run('fit', '--online', '--model', base, '--arch', 'mlp',
                 '--subset', SUBSET, '--epochs', 3, '--lr', 0.05,
                 '--out', out, '--json')
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary['test_accuracy'] >= 0.3
    assert os.path.exists(out / 'gradnet.npz')


def test_fit_with_metric_saves_and_reloads_it(stores, tmp_path):
    """--normalize metric: the metric is fitted on the training store,
    saved as metric.h5 and used again by evaluate."""
    train, test = stores
    out = tmp_path / 'gn'
    result = run('fit', '--train', train, '--test', test, '--epochs', 1,
                 '--normalize', 'metric', '--metric-max-block', 16,
                 '--hidden', '3,4,2,1,1', '--out', out, '--json')
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (out / 'metric.h5').exists()
    settings = json.loads((out / 'gradnet.json').read_text())['settings']
    assert settings['metric'] == {'partition': 'per_unit', 'max_block': 16,
                                  'damping': 1e-3}
    _, normalizer, _ = load_gradnet(str(out))
    with TangentStore.open(train) as store:
        q = store.provenance['q']
        assert normalizer.q == q
        assert int(normalizer.metric.blocks.sizes.max()) == 16
        # whitened rows stay sparse: the percentile rule at the store's q
        csr = normalizer(store.read(0, 5).csr)
        segments = len(normalizer.metric.segment_sizes)
        per_row = np.diff(csr.indptr)
        assert (per_row > 0).all()
        assert (per_row <= (1 - q / 100) * csr.shape[1] + segments).all()
    evaluated = json.loads(run('evaluate', '--gradnet', out, '--test', test,
                               '--json').output)
    assert evaluated['test_accuracy'] == pytest.approx(
        summary['test_accuracy'])


def test_fit_metric_over_budget_is_one_line_error(stores, tmp_path):
    train, test = stores
    result = CliRunner().invoke(main, [
        'fit', '--train', str(train), '--test', str(test), '--normalize',
        'metric', '--metric-partition', 'per_layer', '--metric-max-block',
        '0', '--out', str(tmp_path / 'x')])
    assert result.exit_code == 1
    assert result.output.startswith('error: the block-diagonal metric needs')
    assert 'max_block=' in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_online_fit_with_metric(base, tmp_path):
    """Online mode fits the metric on the same pass as the column
    statistics would take (gradnet split, random candidates) at --q."""
    out = tmp_path / 'online'
    run('fit', '--online', '--model', base, '--arch', 'mlp', '--subset',
        20, '--epochs', 1, '--q', 90, '--normalize', 'metric',
        '--metric-partition', 'diagonal', '--out', out, '--json')
    _, normalizer, _ = load_gradnet(str(out))
    assert normalizer.q == 90 and normalizer.metric.diagonal
    assert normalizer.metric.weight_sum == 20     # one row per digit


def test_fit_uses_the_metric_extract_accumulated(base, stores, tmp_path,
                                                 monkeypatch):
    """extract --normalize metric saves the sums beside the store; fit
    --normalize metric with the same blocks uses them (no pass of its
    own) and gets the metric a pass over the store gives; other blocks
    or a re-extracted store mean a warning and a pass."""
    train = tmp_path / 'train.h5'
    run('extract', '--split', 'gradnet', '--out', train, '--model', base,
        '--arch', 'mlp', '--subset', SUBSET, '--device', 'cpu', '--json',
        '--normalize', 'metric', '--metric-max-block', 16)
    _, test = stores
    fit_args = ('fit', '--train', train, '--test', test, '--epochs', 1,
                '--normalize', 'metric', '--hidden', '3,4,2,1,1', '--json')

    def no_pass(*args, **kwargs):
        raise AssertionError('fit made its own pass over the store')

    with monkeypatch.context() as patch:
        patch.setattr(MetricNormalizer, 'accumulate', no_pass)
        run(*fit_args, '--metric-max-block', 16, '--out', tmp_path / 'a')
    with pytest.warns(UserWarning, match='other blocks'):
        run(*fit_args, '--metric-max-block', 8, '--out', tmp_path / 'b')
    stored = load_gradnet(str(tmp_path / 'a'))[1].metric
    with TangentStore.open(train) as store:
        layout = ParameterLayout.from_dict(store.layout)
        one_pass = MetricNormalizer.fit(
            TrainingFeatures(layout, store.provenance['q'],
                             lambda: (b.csr for b in store.iter_batches(100))),
            NormalizeOptions('metric', metric=MetricOptions(max_block=16))
        ).metric
    assert stored.blocks == one_pass.blocks
    assert stored.weight_sum == one_pass.weight_sum == SUBSET
    np.testing.assert_allclose(stored.G, one_pass.G, rtol=1e-9)
    np.testing.assert_allclose(stored.inverse_sqrt(), one_pass.inverse_sqrt(),
                               rtol=1e-4, atol=1e-6)
    os.replace(tmp_path / 'train.metric.h5', tmp_path / 'kept.metric.h5')
    os.remove(train)
    run('extract', '--split', 'gradnet', '--out', train, '--model', base,
        '--arch', 'mlp', '--subset', SUBSET, '--device', 'cpu', '--json')
    os.replace(tmp_path / 'kept.metric.h5', tmp_path / 'train.metric.h5')
    with pytest.warns(UserWarning, match='other rows'):
        run(*fit_args, '--metric-max-block', 16, '--out', tmp_path / 'c')
