"""Base-network training, snapshots and their reloading."""
import json
import os

import numpy as np
import pytest

from gradnet_cupy.chainer_compat import chainer
from gradnet_cupy.data import load_dataset
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.models import build_model
from gradnet_cupy.files import atomic_write
from gradnet_cupy.train_base import (evaluate, load_base, load_snapshot,
                                     read_snapshots, save_snapshot,
                                     train_base)

SETTINGS = dict(epochs=5, lr=0.05, batch=32, seed=1, progress=False)


@pytest.fixture(scope='module')
def mnist_small():
    return load_dataset('mnist', subset=1000)


@pytest.fixture(scope='module')
def trained(mnist_small, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('base'))
    return out, train_base(mnist_small, 'mlp', out, **SETTINGS)


def all_arrays(model):
    """Every parameter and persistent array of a model, by path."""
    arrays = {path: p.array for path, p in model.namedparams()}
    for link_path, link in model.namedlinks():
        for name in link._persistent:
            arrays[f'{link_path}/{name}'] = np.asarray(getattr(link, name))
    return arrays


def test_training_beats_chance_and_writes_snapshots(trained, mnist_small):
    out, summary = trained
    assert summary['epochs_run'] == 5
    assert summary['test_accuracy'] > 0.6            # chance is 0.1
    records = json.load(open(os.path.join(out, 'snapshots.json')))
    assert [r['epoch'] for r in records] == [1, 2, 3, 4, 5]
    assert records == summary['snapshots']
    assert records[-1]['train_loss'] < records[0]['train_loss']
    assert sorted(os.listdir(out)) == ['base.json', 'snapshot_epoch_1.npz',
                                       'snapshot_epoch_2.npz',
                                       'snapshot_epoch_3.npz',
                                       'snapshot_epoch_4.npz',
                                       'snapshot_epoch_5.npz',
                                       'snapshots.json']
    # The recorded accuracy is the accuracy of the stored snapshot.
    for record in read_snapshots(out):
        model = load_snapshot(build_model('mlp', (1, 28, 28), 10),
                              record['path'])
        assert evaluate(model, mnist_small.test, mnist_small.eval_transform,
                        'cpu') == record['test_accuracy']


def test_training_is_deterministic_and_stops_at_accuracy(trained, mnist_small,
                                                         tmp_path):
    """Same seed, same run: with stop-at-accuracy set to epoch 3's accuracy
    the run stops at the first epoch that reached it."""
    _, summary = trained
    accuracies = [r['test_accuracy'] for r in summary['snapshots']]
    target = accuracies[2]
    first = next(i for i, a in enumerate(accuracies, 1) if a >= target)
    again = train_base(mnist_small, 'mlp', str(tmp_path),
                       stop_at_accuracy=target, **SETTINGS)
    assert again['epochs_run'] == first
    assert again['snapshots'] == [
        dict(r) for r in summary['snapshots'][:first]]
    assert not os.path.exists(tmp_path / f'snapshot_epoch_{first + 1}.npz')


def test_snapshot_reloads_bit_identically(mnist_small, tmp_path):
    """A residual network (with batch-norm persistents) after training."""
    summary = train_base(mnist_small.__class__(**{
        **mnist_small.__dict__, 'base': (mnist_small.base[0][:64],
                                         mnist_small.base[1][:64]),
        'test': (mnist_small.test[0][:50], mnist_small.test[1][:50])}),
        'resnet', str(tmp_path), epochs=1, batch=16, progress=False)
    model, config, record = load_base(str(tmp_path))
    assert config['model'] == 'resnet' and record['epoch'] == 1
    assert record['path'] == summary['snapshot']
    reference = build_model('resnet', (1, 28, 28), 10)
    chainer.serializers.load_npz(summary['snapshot'], reference)
    loaded, expected = all_arrays(model), all_arrays(reference)
    assert set(loaded) == set(expected) and len(loaded) > 40
    assert any(k.endswith('/avg_mean') for k in loaded)
    for key in expected:
        assert loaded[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(loaded[key], expected[key])
    # Training moved the weights away from the initial ones.
    initial = all_arrays(build_model('resnet', (1, 28, 28), 10))
    assert not np.array_equal(initial['/fc/W'], loaded['/fc/W'])


def test_save_then_load_is_exact(rng, tmp_path):
    model = build_model('cnn', (3, 24, 24), 10, seed=5)
    for p in model.params():
        p.array[...] = rng.standard_normal(p.shape).astype(np.float32)
    save_snapshot(model, str(tmp_path / 'm.npz'))
    other = load_snapshot(build_model('cnn', (3, 24, 24), 10, seed=6),
                          str(tmp_path / 'm.npz'))
    for (name, a), (_, b) in zip(sorted(model.namedparams()),
                                 sorted(other.namedparams())):
        np.testing.assert_array_equal(a.array, b.array, err_msg=name)


def test_mismatched_snapshots_are_refused(trained, tmp_path):
    out, summary = trained
    path = summary['snapshot']
    with pytest.raises(GradnetError, match='does not match model cnn.*'
                                           'missing conv1/W.*unexpected fc1/W'):
        load_snapshot(build_model('cnn', (1, 28, 28), 10), path)
    with pytest.raises(GradnetError, match=r'fc5/W has shape \(10, 32\), '
                                           r'model needs \(5, 32\)'):
        load_snapshot(build_model('mlp', (1, 28, 28), 5), path)
    broken = tmp_path / 'broken.npz'
    broken.write_bytes(open(path, 'rb').read()[:300])
    with pytest.raises(GradnetError, match='not a readable snapshot'):
        load_snapshot(build_model('mlp', (1, 28, 28), 10), str(broken))
    with pytest.raises(GradnetError, match='no snapshot of epoch 9'):
        load_base(out, epoch=9)


def test_out_with_a_previous_run(trained, mnist_small, tmp_path):
    (tmp_path / 'snapshot_epoch_7.npz').write_bytes(b'old')
    with pytest.raises(GradnetError, match='already holds a training run'):
        train_base(mnist_small, 'mlp', str(tmp_path), **SETTINGS)
    train_base(load_dataset('mnist', subset=40), 'mlp', str(tmp_path),
               **{**SETTINGS, 'epochs': 1}, overwrite=True)
    assert not os.path.exists(tmp_path / 'snapshot_epoch_7.npz')
    assert [r['epoch'] for r in read_snapshots(str(tmp_path))] == [1]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def failing(f):
        f.write(b'partial')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        atomic_write(str(tmp_path / 'snapshot_epoch_1.npz'), failing)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('setting,match', [
    ({'epochs': 0}, 'epochs'), ({'batch': 0}, 'batch'), ({'lr': 0}, 'lr'),
    ({'momentum': 1.0}, 'momentum'), ({'weight_decay': -1}, 'weight decay'),
    ({'optimizer': 'adam'}, "unknown optimizer 'adam'"),
    ({'stop_at_accuracy': 1.5}, 'stop-at-accuracy')])
def test_bad_settings(mnist_small, tmp_path, setting, match):
    with pytest.raises(GradnetError, match=match):
        train_base(mnist_small, 'mlp', str(tmp_path), **setting)
    assert os.listdir(tmp_path) == []


def test_sgd_weight_decay_step_equals_its_formula(tmp_path):
    """One SGD step (the whole base split in one batch) with weight decay
    lambda differs from the same step without it by exactly
    -lr * lambda * w0 (w0: the initial weights): w <- w - lr (g + lambda w)."""
    small = load_dataset('mnist', subset=40)
    lr, decay = 0.1, 0.5
    weights = {}
    for name, wd in (('plain', 0.0), ('decay', decay)):
        train_base(small, 'mlp', str(tmp_path / name), epochs=1, lr=lr,
                   batch=len(small.base[0]), optimizer='sgd',
                   weight_decay=wd, progress=False)
        model = load_snapshot(build_model('mlp', small.in_shape, 10),
                              str(tmp_path / name / 'snapshot_epoch_1.npz'))
        weights[name] = {p: v.array for p, v in model.namedparams()}
    assert json.load(open(tmp_path / 'decay' / 'base.json'))['optimizer'] \
        == 'sgd'
    initial = build_model('mlp', small.in_shape, 10, seed=0)
    for path, w0 in initial.namedparams():
        np.testing.assert_allclose(
            weights['decay'][path] - weights['plain'][path],
            -lr * decay * w0.array, rtol=1e-4, atol=1e-6, err_msg=path)
