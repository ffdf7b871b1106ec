"""The important-edges graph (issue #17 §1) against a plain NumPy
computation of the same definition: per-sample gradients by Chainer
autograd one sample at a time, the percentile rule by numpy.percentile."""
import json
import math
import os
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
from click.testing import CliRunner

from gradnet_cupy.chainer_compat import chainer, F
from gradnet_cupy.cli import main
from gradnet_cupy.edges import (edge_statistics, select_edges, summarize,
                                unit_layers)
from gradnet_cupy.edges.graph import paths_from_second_layer
from gradnet_cupy.models import build_model
from gradnet_cupy.tangent import parameter_layout
from gradnet_cupy.train_base import save_snapshot

N_CLASSES = 3
Q = 80.0
ALPHA = 0.05


def sample_gradients(model, x, label):
    """{layer name: W gradient} of CE(model(x), label) for one sample."""
    model.cleargrads()
    with chainer.using_config('train', False):
        loss = F.softmax_cross_entropy(model(x[None]),
                                       np.array([label], dtype=np.int32))
    loss.backward()
    return [np.array(model[name].W.grad) for name in model.layer_names]


def oracle(model, x, y, q, alpha, target=None):
    """Per class: (kept counts, mean |g|, selected ids) per layer, edges as
    (out unit, in unit) with a cnn's taps (and the fc's positions per
    channel) summed."""
    kept = [[0] * len(model.layer_names) for _ in range(N_CLASSES)]
    total = [[0] * len(model.layer_names) for _ in range(N_CLASSES)]
    for xi, yi in zip(x, y):
        grads = sample_gradients(model, xi, yi if target is None else target)
        for k, g in enumerate(grads):
            magnitude = np.abs(g.astype(np.float64))
            keep = magnitude > np.percentile(magnitude.ravel(), q)
            n_out = g.shape[0]
            n_in = g.shape[1] if g.ndim == 4 or k == 0 else \
                grads[k - 1].shape[0]
            edge_keep = keep.reshape(n_out, n_in, -1).any(axis=2)
            edge_abs = (magnitude * keep).reshape(n_out, n_in, -1).sum(axis=2)
            kept[yi][k] = kept[yi][k] + edge_keep.ravel().astype(np.int64)
            total[yi][k] = total[yi][k] + edge_abs.ravel()
    counts = np.bincount(y, minlength=N_CLASSES)
    result = []
    for c in range(N_CLASSES):
        layers = []
        for k in range(len(model.layer_names)):
            freq, mean = kept[c][k] / counts[c], total[c][k] / counts[c]
            order = np.lexsort((np.arange(freq.size), -freq, -mean))
            layers.append((kept[c][k], mean,
                           np.sort(order[:math.ceil(alpha * freq.size)])))
        result.append(layers)
    return result


def small_model(arch, seed=1):
    in_shape = (1, 4, 4) if arch == 'mlp' else (1, 8, 8)
    model = build_model(arch, in_shape, N_CLASSES, seed=seed)
    rng = np.random.RandomState(seed)
    x = rng.uniform(0.1, 1.0, size=(9,) + in_shape).astype(np.float32)
    y = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1], dtype=np.int32)
    return model, x, y


@pytest.mark.parametrize('arch, target', [('mlp', None), ('mlp', 2),
                                          ('cnn', None)])
def test_selection_equals_the_numpy_oracle(arch, target):
    model, x, y = small_model(arch)
    layout = parameter_layout(model)
    stats = edge_statistics(model, layout, x, y, N_CLASSES, Q,
                            target_label=target, batch=4)
    selection = select_edges(stats, ALPHA)
    expected = oracle(model, x, y, Q, ALPHA, target)
    for c in range(N_CLASSES):
        for k, (kept, mean, chosen) in enumerate(expected[c]):
            frequency, mean_abs = (a[c] for a in stats.layer(k))
            np.testing.assert_array_equal(
                np.rint(frequency * stats.n_samples[c]).astype(np.int64),
                kept)
            np.testing.assert_allclose(mean_abs, mean, rtol=1e-4,
                                       atol=1e-12)
            np.testing.assert_array_equal(selection[c][k], chosen)
            assert selection[c][k].size == math.ceil(ALPHA * mean.size)


def test_units_of_a_cnn_are_channels():
    model, _, _ = small_model('cnn')
    layers = unit_layers(parameter_layout(model))
    # conv1 1 -> 64 (25 taps), conv2 64 -> 64 (25 taps), fc 64 -> 3 with
    # the 2x2 positions of each channel
    assert [(la.n_in, la.n_out, la.taps) for la in layers] == \
        [(1, 64, 25), (64, 64, 25), (64, N_CLASSES, 4)]


def test_paths_are_counted_along_chosen_edges():
    model, _, _ = small_model('mlp')
    layers = unit_layers(parameter_layout(model))
    # fc2: 0 -> 0 and 1 -> 0 (ids out * n_in + in); fc3: 0 -> 5; fc4: 5 -> 7
    # and 5 -> 8; fc5: 7 -> 2, 8 -> 2, 8 -> 1
    chosen = [np.array([], dtype=np.int64), np.array([0, 1]),
              np.array([5 * 128]), np.array([7 * 64 + 5, 8 * 64 + 5]),
              np.array([2 * 32 + 7, 2 * 32 + 8, 1 * 32 + 8])]
    # from fc1's units 0 and 1: each 0 -> 5 -> {7 -> 2, 8 -> 2, 8 -> 1}
    assert paths_from_second_layer(layers, chosen) == (6, 2)


def test_summary_counts_nodes_and_overlaps():
    model, x, y = small_model('mlp')
    stats = edge_statistics(model, parameter_layout(model), x, y, N_CLASSES,
                            Q)
    selection = select_edges(stats, ALPHA)
    summary = summarize(stats, selection, ALPHA)
    for c, s in enumerate(summary['classes']):
        pixels = np.unique(selection[c][0] % 16)
        assert s['first_layer_nodes'] == pixels.size
        assert s['selected_edges'] == [math.ceil(ALPHA * la.n_edges)
                                       for la in stats.layers]
    overlap = np.array(summary['jaccard_per_layer'][0])
    a, b = selection[0][0], selection[1][0]
    assert overlap[0, 1] == round(np.intersect1d(a, b).size
                                  / np.union1d(a, b).size, 4)
    assert np.all(np.diag(overlap) == 1)


@pytest.fixture(scope='module')
def snapshot(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('base') / 'mlp.npz')
    save_snapshot(build_model('mlp', (1, 28, 28), 10, seed=3), path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_command_writes_pictures_graphml_and_json(snapshot, tmp_path):
    out = tmp_path / 'edges'
    result = run('edges', '--model', snapshot, '--arch', 'mlp', '--dataset',
                 'mnist', '--split', 'test', '--per-class', 2, '--alpha',
                 0.01, '--out', out, '--device', 'cpu', '--json')
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    with open(out / 'edges.json') as f:
        assert json.load(f) == summary
    assert [s['samples'] for s in summary['classes']] == [2] * 10
    selected = [la['selected'] for la in summary['layers']]
    # 784*256, 256*128, 128*64, 64*32, 32*10 edges; 1% of each, rounded up
    assert selected == [2008, 328, 82, 21, 4]
    for c, s in enumerate(summary['classes']):
        graph = nx.read_graphml(out / f'class_{c}.graphml')
        assert graph.number_of_edges() == sum(selected)
        assert graph.number_of_nodes() == sum(s['nodes'])
        assert sum(1 for _, d in graph.nodes(data=True)
                   if d['layer'] == 0) == s['first_layer_nodes']
    for name in [f'class_{c}.png' for c in range(10)] + ['overlay.png']:
        with open(out / name, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')]


@pytest.mark.parametrize('args, message', [
    (['--arch', 'resnet'], 'chain network'),
    (['--alpha', '0'], 'alpha must be in (0, 1]'),
    (['--target-label', '10'], 'target label 10'),
    (['--per-class', '0'], 'per-class must be >= 1'),
])
def test_bad_input_is_one_error_line(snapshot, tmp_path, args, message):
    result = run('edges', '--model', snapshot, '--arch', 'mlp',
                 '--out', tmp_path / 'e', '--device', 'cpu', *args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith('error: ') and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / 'e').exists()


@pytest.mark.parametrize('first', ['gradnet_cupy.cli',
                                   'gradnet_cupy.edges.cli'])
def test_commands_are_registered_whichever_module_comes_first(first):
    code = (f'import {first}; from gradnet_cupy.cli import main; '
            "print(main.list_commands(None), "
            "[main.get_command(None, n).name for n in ('edges', 'metric-size')])")
    names = subprocess.run([sys.executable, '-c', code], check=True,
                           capture_output=True, text=True).stdout
    assert names.count("'edges'") == 2 and names.count("'metric-size'") == 2
