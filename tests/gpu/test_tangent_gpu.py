"""gradnet_cupy.tangent on CuPy against the same extraction on NumPy.

Skipped without a CUDA device (tests/gpu/conftest.py). Relative error is
``max|A - B| / max|B|`` over the whole batch, as in tests/test_tangent.py.
"""
import copy

import numpy as np
import pytest

from gradnet_cupy.backend import to_numpy
from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.models import build_model, model_to_device
from gradnet_cupy.tangent import (
    logit_jacobian, parameter_layout, tangent_features)


class Zoo(chainer.Chain):
    """Every batched rule: grouped strided dilated conv, deconvolution,
    BatchNormalization, EmbedID, Linear over two batch axes."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.emb = L.EmbedID(5, 2 * 9 * 8, ignore_label=-1)
            self.c1 = L.Convolution2D(2, 6, 3, stride=2, pad=(1, 2),
                                      dilate=2, groups=2)
            self.bn = L.BatchNormalization(6)
            self.d1 = L.Deconvolution2D(6, 4, 3, stride=2, pad=1, groups=2)
            self.fc = L.Linear(None, 4)

    def forward(self, ids):
        h = F.sum(self.emb(ids), axis=1).reshape(-1, 2, 9, 8)
        h = F.tanh(self.bn(self.c1(h)))
        return self.fc(F.tanh(self.d1(h)))


def both(model, x):
    """(CPU model, x) and a GPU copy of both."""
    gpu = model_to_device(copy.deepcopy(model), 'gpu')
    import cupy
    return (model, x), (gpu, cupy.asarray(x))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize('arch,mode', [('mlp', 'all'), ('cnn', 'all'),
                                       ('resnet', 'random')])
def test_gpu_matches_cpu_on_package_models(arch, mode):
    model = build_model(arch, (1, 28, 28), 10, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(
        np.float32)
    layout = parameter_layout(model, include_bias=True,
                              include_batchnorm=True)
    (cm, cx), (gm, gx) = both(model, x)
    cpu = tangent_features(cm, cx, candidates=mode, layout=layout)
    gpu = tangent_features(gm, gx, candidates=mode, layout=layout)
    for a, b in zip(gpu[1:], cpu[1:]):
        np.testing.assert_array_equal(to_numpy(a), b)
    assert rel_err(to_numpy(gpu.features), cpu.features) <= 1e-4


def test_gpu_matches_cpu_on_every_rule():
    np.random.seed(0)
    model = Zoo()
    ids = np.random.default_rng(0).integers(-1, 5, (5, 3)).astype(np.int32)
    with chainer.using_config('train', False):
        model(ids)
    layout = parameter_layout(model, include_bias=True,
                              include_batchnorm=True,
                              include_deconvolution=True,
                              include_embed_id=True)
    (cm, cx), (gm, gx) = both(model, ids)
    cpu = tangent_features(cm, cx, candidates='all', layout=layout)
    gpu = tangent_features(gm, gx, candidates='all', layout=layout,
                           max_bytes=1)
    assert rel_err(to_numpy(gpu.features), cpu.features) <= 1e-4
    jac_cpu = logit_jacobian(cm, cx, layout=layout)
    jac_gpu = logit_jacobian(gm, gx, layout=layout)
    assert rel_err(to_numpy(jac_gpu), jac_cpu) <= 1e-4
