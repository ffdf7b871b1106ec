"""Scoring the test split without a test store (``--online-test``): the
same rows, outputs and accuracy as through a store, and mismatches refused;
and the evaluation streams its batches (it keeps none of them)."""
import gc
import json
import weakref

import numpy as np
import pytest
from click.testing import CliRunner

from gradnet_cupy.cli import main, online_test_source
from gradnet_cupy.gradnet import (candidate_outputs, evaluate_candidates,
                                  load_gradnet, online_test_batches,
                                  store_test_batches)
from gradnet_cupy.store import TangentStore

SUBSET = 30


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
    """A base MLP, its stores and a GradNet fitted on them."""
    folder = tmp_path_factory.mktemp('online_test')
    run('train-base', '--model', 'mlp', '--subset', SUBSET, '--epochs', 1,
        '--out', folder / 'base', '--device', 'cpu', '--json')
    base = folder / 'base' / 'snapshot_epoch_1.npz'
    common = ('--model', base, '--arch', 'mlp', '--subset', SUBSET,
              '--device', 'cpu', '--json')
    run('extract', '--split', 'gradnet', '--out', folder / 'train.h5',
        *common)
    run('extract', '--split', 'test', '--candidates', 'all', '--out',
        folder / 'test.h5', *common)
    run('fit', '--train', folder / 'train.h5', '--test', folder / 'test.h5',
        '--epochs', 1, '--out', folder / 'gn', '--json')
    return folder, base


def test_online_test_batches_equal_the_test_store(fitted):
    folder, base = fitted
    model, normalizer, _ = load_gradnet(str(folder / 'gn'))
    test = online_test_source(str(base), 'mlp', 'mnist', None, SUBSET, 'cpu')
    with TangentStore.open(folder / 'test.h5') as store:
        stored = list(store_test_batches(store, 'cpu'))
        online = list(online_test_batches(test.base, test.layout, test.data,
                                          store.provenance['q'], 'cpu'))
    for part in (lambda b: b[0].indices, lambda b: b[0].data,
                 lambda b: np.diff(b[0].indptr), lambda b: b[1],
                 lambda b: b[2]):
        np.testing.assert_array_equal(
            np.concatenate([part(b) for b in online]),
            np.concatenate([part(b) for b in stored]))
    outputs = [np.concatenate([candidate_outputs(model, normalizer(b[0]))
                               for b in batches])
               for batches in (stored, online)]
    assert outputs[0].shape == (SUBSET * 10, 10)
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_evaluate_and_fit_online_test_equal_the_store(fitted, tmp_path):
    folder, base = fitted
    online = ('--online-test', '--model', base, '--arch', 'mlp', '--subset',
              SUBSET)
    stored = json.loads(run('evaluate', '--gradnet', folder / 'gn', '--test',
                            folder / 'test.h5', '--json').output)
    scored = json.loads(run('evaluate', '--gradnet', folder / 'gn', *online,
                            '--json').output)
    assert scored['samples'] == stored['samples'] == SUBSET
    assert scored['test_accuracy'] == pytest.approx(stored['test_accuracy'])
    assert scored['confusion'] == stored['confusion']
    run('fit', '--train', folder / 'train.h5', *online, '--epochs', 1,
        '--out', tmp_path / 'gn', '--json')
    history = [json.loads((f / 'gradnet.json').read_text())['history']
               for f in (folder / 'gn', tmp_path / 'gn')]
    assert [h['test_accuracy'] for h in history[1]] == pytest.approx(
        [h['test_accuracy'] for h in history[0]])
    assert [h['train_loss'] for h in history[1]] == \
        [h['train_loss'] for h in history[0]]


def test_online_test_refuses_mismatches(fitted, tmp_path):
    folder, base = fitted
    gn = folder / 'gn'
    result = run('evaluate', '--gradnet', gn, '--online-test', '--model',
                 base, '--arch', 'mlp', '--dataset', 'fashion-mnist',
                 '--data-dir', tmp_path, code=1)
    assert result.output.startswith('error:')
    result = run('evaluate', '--gradnet', gn, '--online-test', '--model',
                 base, '--arch', 'mlp', '--subset', SUBSET, '--q', 90,
                 code=2)
    other = tmp_path / 'other'
    run('train-base', '--model', 'mlp', '--subset', SUBSET, '--epochs', 1,
        '--seed', 1, '--out', other, '--device', 'cpu', '--json')
    result = run('evaluate', '--gradnet', gn, '--online-test', '--model',
                 other / 'snapshot_epoch_1.npz', '--arch', 'mlp',
                 '--subset', SUBSET, code=1)
    assert 'differs in model_sha256' in result.output
    assert len(result.output.strip().splitlines()) == 1
    for args in (['--online-test'], ['--online-test', '--model', base,
                                     '--test', folder / 'test.h5'], []):
        result = run('evaluate', '--gradnet', gn, *args, code=1)
        assert '--test STORE or --online-test' in result.output
    result = run('fit', '--train', folder / 'train.h5', '--test',
                 folder / 'test.h5', '--online-test', '--model', base,
                 '--arch', 'mlp', '--out', tmp_path / 'x', code=1)
    assert '--online-test' in result.output


def test_evaluation_keeps_no_batch(fitted):
    """evaluate_candidates holds one batch at a time: the values of every
    CSR it was given are gone (weak references dead) by the time it asks
    for the next batch."""
    folder, _ = fitted
    model, normalizer, _ = load_gradnet(str(folder / 'gn'))
    alive = []

    def watched(batches):
        for csr, sample, target in batches:
            gc.collect()
            alive.append(sum(ref() is not None for ref in refs))
            refs.append(weakref.ref(csr.data))
            yield csr, sample, target

    refs = []
    with TangentStore.open(folder / 'test.h5') as store:
        evaluate_candidates(model, watched(store_test_batches(
            store, 'cpu', batch=3)), normalizer)
    assert len(alive) == SUBSET // 3 and max(alive) == 0
