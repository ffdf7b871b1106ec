"""Base networks (gradnet_cupy.models)."""
import math

import numpy as np
import pytest

from gradnet_cupy.chainer_compat import chainer, L
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.models import (MODELS, build_model, get_link,
                                 model_to_device)


def conv_size(n, k, pad):
    return n + 2 * pad - k + 1


def pool_size(n):
    """max pooling 2x2, stride 2, covering every input pixel."""
    return math.ceil((n - 2) / 2) + 1


def cnn_weight_sizes(channels, height, width, classes):
    """W sizes of the paper's CNN from its architecture formula."""
    h = pool_size(conv_size(pool_size(conv_size(height, 5, 1)), 5, 2))
    w = pool_size(conv_size(pool_size(conv_size(width, 5, 1)), 5, 2))
    return [64 * channels * 25, 64 * 64 * 25, 64 * h * w * classes]


def weight_sizes(model):
    return [model[name].W.size for name in model.layer_names]


def test_cnn_weight_counts_on_cifar_crops():
    model = build_model('cnn', (3, 24, 24), 10)
    assert weight_sizes(model) == cnn_weight_sizes(3, 24, 24, 10)
    assert weight_sizes(model) == [4800, 102400, 23040]
    # Known before any forward pass: no lazily initialised parameter.
    assert all(p.array is not None for p in model.params())
    n_bias = 64 + 64 + 10
    assert model.count_params() == 4800 + 102400 + 23040 + n_bias


def test_cnn_weight_counts_on_mnist():
    model = build_model('cnn', (1, 28, 28), 10)
    assert weight_sizes(model) == cnn_weight_sizes(1, 28, 28, 10)


def test_mlp_shapes():
    model = build_model('mlp', (1, 28, 28), 10)
    assert [model[n].W.shape for n in model.layer_names] == [
        (256, 784), (128, 256), (64, 128), (32, 64), (10, 32)]


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('in_shape,classes', [((1, 28, 28), 10),
                                              ((3, 24, 24), 7)])
def test_output_shape_and_layer_names(name, in_shape, classes, rng):
    model = build_model(name, in_shape, classes)
    assert model.arch == name and model.in_shape == in_shape
    assert model.n_classes == classes
    x = rng.random((3,) + in_shape, dtype=np.float32)
    with chainer.using_config('train', False):
        y = model(x)
    assert y.shape == (3, classes) and y.dtype == np.float32
    weighted = {path.lstrip('/') for path, link in model.namedlinks()
                if isinstance(link, (L.Convolution2D, L.Linear))}
    assert sorted(model.layer_names) == sorted(weighted)
    # All weight layers get a gradient from the logits.
    y = model(x)
    model.cleargrads()
    chainer.functions.sum(y * y).backward()
    for layer in model.layer_names:
        assert np.abs(get_link(model, layer).W.grad).sum() > 0, layer


def test_layer_names_are_in_forward_order():
    """Each weight layer's input size matches the previous layer's output
    (the residual projections branch off the block input)."""
    resnet = build_model('resnet', (3, 24, 24), 10)
    channels = [get_link(resnet, n).W.shape[:2]
                for n in resnet.layer_names]
    assert resnet.layer_names[0] == 'conv0' and resnet.layer_names[-1] == 'fc'
    assert channels == [(16, 3), (16, 16), (16, 16), (32, 16), (32, 32),
                        (32, 16), (64, 32), (64, 64), (64, 32), (10, 64)]
    assert build_model('cnn', (1, 28, 28), 10).layer_names == (
        'conv1', 'conv2', 'fc')


def test_resnet_batch_norm_test_mode_is_per_sample(rng):
    model = build_model('resnet', (1, 28, 28), 10)
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    assert any(isinstance(link, L.BatchNormalization)
               for link in model.links())
    with chainer.using_config('train', False):
        whole = model(x).array
        single = model(x[:1]).array
    np.testing.assert_allclose(single, whole[:1], rtol=1e-5, atol=1e-6)
    with chainer.using_config('train', True):     # batch statistics differ
        assert not np.allclose(model(x[:2]).array, model(x).array[:2],
                               atol=1e-4)


def test_seed_fixes_the_initial_weights():
    a, b = (build_model('cnn', (1, 28, 28), 10, seed=3) for _ in range(2))
    c = build_model('cnn', (1, 28, 28), 10, seed=4)
    for (name, pa), (_, pb), (_, pc) in zip(
            sorted(a.namedparams()), sorted(b.namedparams()),
            sorted(c.namedparams())):
        np.testing.assert_array_equal(pa.array, pb.array)
        if name.endswith('/W'):
            assert not np.array_equal(pa.array, pc.array)


def test_unknown_model_names_the_choices():
    with pytest.raises(GradnetError, match="unknown model 'vgg'.*cnn, mlp, "
                                           "resnet"):
        build_model('vgg', (1, 28, 28), 10)


@pytest.mark.parametrize('in_shape,classes,match', [
    ((28, 28), 10, 'in_shape'), ((1, 0, 28), 10, 'in_shape'),
    ((1, 28, 28), 1, 'n_classes'), ((1, 2, 2), 10, 'at least 3x3')])
def test_bad_shapes(in_shape, classes, match):
    with pytest.raises(GradnetError, match=match):
        build_model('cnn', in_shape, classes)


def test_to_device_without_chainer_cuda_is_a_clear_error(monkeypatch):
    model = build_model('mlp', (1, 28, 28), 10)
    monkeypatch.setattr(chainer.backends.cuda, 'available', False)
    with pytest.raises(GradnetError, match='Chainer cannot use CuPy'):
        model_to_device(model, 'gpu')
    assert model_to_device(model, 'cpu') is model
    assert isinstance(model.fc1.W.array, np.ndarray)
