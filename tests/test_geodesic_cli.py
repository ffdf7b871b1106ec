"""The sparsify-path and task-path commands on tiny settings (CliRunner)."""
import importlib
import json
import os

import click
import numpy as np
import pytest
from click.testing import CliRunner

from gradnet_cupy.cli import Group
from gradnet_cupy.data import load_dataset
from gradnet_cupy.geodesic.cli import COMMANDS
from gradnet_cupy.geodesic.weights import get_weights, layout_of
from gradnet_cupy.models import build_model
from gradnet_cupy.train_base import load_snapshot, save_snapshot


@click.group(cls=Group)
def main():
    """Test group holding the geodesic commands, as gradnet_cupy.cli does."""


for _command in COMMANDS:
    main.add_command(_command)

TINY = ['--subset', '40', '--device', 'cpu', '--batch', '2']


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    return lines[0]


@pytest.fixture(scope='module')
def snapshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp('snapshots')
    data = load_dataset('mnist', subset=4)
    paths = {}
    for name, arch, seed in (('mlp1', 'mlp', 0), ('mlp2', 'mlp', 1),
                             ('cnn', 'cnn', 0)):
        paths[name] = str(folder / f'{name}.npz')
        save_snapshot(build_model(arch, data.in_shape, 10, seed),
                      paths[name])
    return paths


@pytest.mark.parametrize('command', ['sparsify-path', 'task-path'])
def test_help_lists_shared_options(command):
    result = run(command, '--help')
    assert result.exit_code == 0
    for option in ('--device', '--seed', '--json', '--method', '--out'):
        assert option in result.stdout


def sparsified(snapshot, out, method, *extra):
    result = run('sparsify-path', '--model', snapshot, '--arch', 'mlp',
                 '--sparsity', 0.7, '--method', method, '--out', out,
                 '--json', *TINY, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize('method,extra', [
    ('geodesic', ['--max-steps', 2]),
    ('geodesic', ['--max-steps', 1, '--solver', 'block',
                  '--partition', 'per_unit', '--max-block', 64]),
    ('fip', ['--max-steps', 2]),
    ('one-shot', []),
    ('prune-finetune', ['--passes', 0.2, '--rounds', 2])])
def test_sparsify_path_writes_a_sparse_loadable_network(
        snapshots, tmp_path, method, extra):
    out = tmp_path / 'run'
    summary = sparsified(snapshots['mlp1'], out, method, *extra)
    assert summary['sparsity'] == pytest.approx(0.7, abs=0.01)
    for name in ('final.npz', 'history.json', 'path.png'):
        assert (out / name).exists()
    assert not (out / 'checkpoint.npz').exists()
    assert not (out / 'checkpoint.json').exists()
    data = load_dataset('mnist', subset=4)
    model = load_snapshot(build_model('mlp', data.in_shape, 10),
                          str(out / 'final.npz'))
    w = get_weights(model, layout_of(model))
    assert float((w == 0).mean()) == pytest.approx(0.7, abs=0.01)
    record = json.loads((out / 'history.json').read_text())
    assert record['summary']['accuracy'] == summary['accuracy']


@pytest.mark.parametrize('anchor', [0, 1])
def test_sparsify_path_anchor_reaches_the_geodesic_walk(snapshots, tmp_path,
                                                         anchor):
    out = tmp_path / 'run'
    sparsified(snapshots['mlp1'], out, 'geodesic', '--max-steps', 2,
               '--anchor', anchor)
    steps = json.loads((out / 'history.json').read_text())['history'][1:3]
    assert [('drift' in e) for e in steps] == [bool(anchor)] * 2


def test_sparsify_path_structured_removes_filters(snapshots, tmp_path):
    out = tmp_path / 'run'
    result = run('sparsify-path', '--model', snapshots['cnn'], '--arch',
                 'cnn', '--structured', 'conv1:50', '--include-bias',
                 '--method', 'geodesic', '--max-steps', 1, '--out', out,
                 '--json', *TINY)
    assert result.exit_code == 0, result.output
    data = load_dataset('mnist', subset=4)
    model = load_snapshot(build_model('cnn', data.in_shape, 10),
                          str(out / 'final.npz'))
    W = model.conv1.W.array.reshape(64, -1)
    dead = (W == 0).all(axis=1) & (model.conv1.b.array == 0)
    assert dead.sum() == 50


def test_sparsify_path_resumes_from_its_checkpoint(snapshots, tmp_path,
                                                   monkeypatch):
    first, second = tmp_path / 'a', tmp_path / 'b'
    whole = sparsified(snapshots['mlp1'], first, 'geodesic', '--max-steps',
                       3, '--checkpoint-every', 1)
    # a run killed after step 2 leaves its checkpoint; the rerun resumes
    walk_module = importlib.import_module('gradnet_cupy.geodesic.walk')
    calls = []
    original = walk_module._Walker.step

    def dying(self, w, v, distance, k):
        if k == 3:
            raise KeyboardInterrupt
        calls.append(k)
        return original(self, w, v, distance, k)

    with monkeypatch.context() as patch:
        patch.setattr(walk_module._Walker, 'step', dying)
        result = run('sparsify-path', '--model', snapshots['mlp1'],
                     '--sparsity', 0.7, '--method', 'geodesic', '--out',
                     second, '--json', '--max-steps', 3,
                     '--checkpoint-every', 1, *TINY)
    assert result.exit_code != 0 and calls == [1, 2]
    assert (second / 'checkpoint.npz').exists()
    assert not (second / 'final.npz').exists()
    resumed = sparsified(snapshots['mlp1'], second, 'geodesic',
                         '--max-steps', 3, '--checkpoint-every', 1)
    assert resumed['steps'] == 3
    assert resumed['accuracy'] == whole['accuracy']
    a = np.load(first / 'final.npz')
    b = np.load(second / 'final.npz')
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize('method,extra', [
    ('geodesic', ['--max-steps', 2, '--eval-every', 1]),
    ('fip', ['--max-steps', 2, '--eval-every', 1]),
    ('interpolate', ['--points', 3]),
    ('finetune', ['--passes', 0.5])])
def test_task_path_logs_both_tasks(snapshots, tmp_path, method, extra):
    out = tmp_path / 'run'
    result = run('task-path', '--from', snapshots['mlp1'], '--to',
                 snapshots['mlp2'], '--arch', 'mlp', '--old', 'mnist',
                 '--new', 'mnist', '--method', method, '--out', out,
                 '--json', *TINY, *extra)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {'old', 'new'} <= set(summary['best'])
    assert summary['best_min_accuracy'] == min(summary['best']['old'],
                                               summary['best']['new'])
    for name in ('final.npz', 'best.npz', 'history.json', 'path.png'):
        assert (out / name).exists(), name
    history = json.loads((out / 'history.json').read_text())['history']
    assert all('old' in e and 'new' in e for e in history)


def test_bad_input_is_one_line_and_writes_nothing(snapshots, tmp_path):
    out = tmp_path / 'run'
    for sparsity in (0, 1.2):
        line = one_error_line(run(
            'sparsify-path', '--model', snapshots['mlp1'], '--sparsity',
            sparsity, '--out', out, *TINY))
        assert 'sparsity must be in (0, 1)' in line
    line = one_error_line(run(
        'task-path', '--from', snapshots['mlp1'], '--to', snapshots['cnn'],
        '--arch', 'mlp', '--new', 'mnist', '--out', out, *TINY))
    assert 'does not match' in line
    assert not os.path.exists(out)


def test_target_already_reached_is_one_line(snapshots, tmp_path):
    first = tmp_path / 'a'
    sparsified(snapshots['mlp1'], first, 'one-shot')
    line = one_error_line(run(
        'sparsify-path', '--model', first / 'final.npz', '--sparsity', 0.7,
        '--out', tmp_path / 'b', *TINY))
    assert 'already' in line
    assert not (tmp_path / 'b').exists()
    line = one_error_line(run(
        'task-path', '--from', snapshots['mlp1'], '--to', snapshots['mlp1'],
        '--new', 'mnist', '--method', 'interpolate', '--out', tmp_path / 'c',
        *TINY))
    assert 'already' in line
    assert not (tmp_path / 'c').exists()


def test_prune_finetune_resumes_after_its_last_round(snapshots, tmp_path,
                                                     monkeypatch):
    options = ['--passes', 0.2, '--rounds', 2]
    whole = sparsified(snapshots['mlp1'], tmp_path / 'a', 'prune-finetune',
                       *options)
    baselines_module = importlib.import_module('gradnet_cupy.geodesic.baselines')
    original, rounds = baselines_module.finetune, []

    def dying(*args, **kwargs):
        if rounds:
            raise KeyboardInterrupt
        rounds.append(1)
        return original(*args, **kwargs)

    out = tmp_path / 'b'
    with monkeypatch.context() as patch:
        patch.setattr(baselines_module, 'finetune', dying)
        result = run('sparsify-path', '--model', snapshots['mlp1'],
                     '--sparsity', 0.7, '--method', 'prune-finetune',
                     '--out', out, '--json', *TINY, *options)
    assert result.exit_code != 0
    assert (out / 'checkpoint.json').exists()
    assert (out / 'checkpoint_model_1.npz').exists()
    resumed = sparsified(snapshots['mlp1'], out, 'prune-finetune', *options)
    assert resumed['accuracy'] == whole['accuracy']
    assert not (out / 'checkpoint.json').exists()
    assert not (out / 'checkpoint_model_1.npz').exists()
    a, b = np.load(tmp_path / 'a' / 'final.npz'), np.load(out / 'final.npz')
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_the_gradnet_cupy_group_serves_the_geodesic_commands():
    """gradnet-cupy lists and runs them, loaded on first use."""
    from gradnet_cupy.cli import main
    assert {c.name: main.LAZY.get(c.name) for c in COMMANDS} == {
        c.name: 'gradnet_cupy.geodesic.cli' for c in COMMANDS}
    for command in COMMANDS:
        result = CliRunner().invoke(main, [command.name, '--help'])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f'Usage: main {command.name}')
    listing = CliRunner().invoke(main, ['--help']).output
    assert 'sparsify-path' in listing and 'task-path' in listing


@pytest.mark.parametrize('include_bias', [False, True])
def test_task_path_moves_the_biases_only_with_include_bias(
        snapshots, tmp_path, include_bias):
    """The straight line ends at w2: at w2's biases too with --include-bias,
    at w1's otherwise (weights W reach w2 either way)."""
    data = load_dataset('mnist', subset=4)
    w1 = load_snapshot(build_model('mlp', data.in_shape, 10),
                       snapshots['mlp1'])
    w2 = load_snapshot(build_model('mlp', data.in_shape, 10),
                       snapshots['mlp2'])
    rng = np.random.default_rng(0)
    for link in w2.children():
        link.b.array[...] = rng.normal(size=link.b.shape)
    to = str(tmp_path / 'to.npz')
    save_snapshot(w2, to)
    out = tmp_path / 'run'
    result = run('task-path', '--from', snapshots['mlp1'], '--to', to,
                 '--arch', 'mlp', '--new', 'mnist', '--method',
                 'interpolate', '--points', 2, '--out', out, '--json', *TINY,
                 *(['--include-bias'] if include_bias else []))
    assert result.exit_code == 0, result.output
    final = load_snapshot(build_model('mlp', data.in_shape, 10),
                          str(out / 'final.npz'))
    links = list(zip(final.children(), w1.children(), w2.children()))
    assert links
    for moved, start, goal in links:
        np.testing.assert_allclose(moved.W.array, goal.W.array, atol=1e-6)
        expected = goal.b.array if include_bias else start.b.array
        np.testing.assert_allclose(moved.b.array, expected, atol=1e-6)
    summary = json.loads(result.stdout)
    gap = summary['distance_w1_w2']
    W_gap = np.sqrt(sum(float(((b.W.array - a.W.array) ** 2).sum())
                        for _, a, b in links))
    bias_gap = np.sqrt(sum(float(((b.b.array - a.b.array) ** 2).sum())
                           for _, a, b in links))
    assert bias_gap > 0
    assert gap == pytest.approx(np.hypot(W_gap, bias_gap) if include_bias
                                else W_gap, rel=1e-5)
