"""gradnet_cupy.tangent against Chainer's own autograd, one sample at a time.

Relative error of a batch of rows A against the oracle B is
``max|A - B| / max|B|`` over the whole batch (robust to entries near 0).
"""
import json
import warnings

import numpy as np
import pytest

from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.models import build_model
from gradnet_cupy.tangent import (
    ParameterLayout, TangentFallbackWarning, iter_logit_jacobian,
    iter_tangent_features, logit_jacobian, parameter_layout, tangent_features)

TOL = {np.float32: 1e-4, np.float64: 1e-10}
DTYPES = [np.float32, np.float64]


# ---------------------------------------------------------------- models

class MLP(chainer.Chain):
    """mlp-like: 20-16-12-8-5 on (n, 1, 4, 5) input (Linear flattens)."""
    in_shape = (1, 4, 5)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(20, 16)
            self.l2 = L.Linear(16, 12)
            self.l3 = L.Linear(12, 8)
            self.l4 = L.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.l1(x))
        h = F.relu(self.l2(h))
        h = F.relu(self.l3(h))
        return self.l4(h)


class CNN(chainer.Chain):
    """cnn-like: Conv 5x5 pad 1 -> relu -> pool 2 -> Conv 5x5 pad 2 -> relu
    -> pool 2 -> Linear, on 1x12x12."""
    in_shape = (1, 12, 12)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 4, 5, pad=1)
            self.conv2 = L.Convolution2D(4, 6, 5, pad=2)
            self.fc = L.Linear(54, 6)

    def forward(self, x):
        h = F.max_pooling_2d(F.relu(self.conv1(x)), 2)
        h = F.max_pooling_2d(F.relu(self.conv2(h)), 2)
        return self.fc(h)


class Block(chainer.Chain):
    def __init__(self, ch):
        super().__init__()
        with self.init_scope():
            self.conv_a = L.Convolution2D(ch, ch, 3, pad=1, nobias=True)
            self.bn_a = L.BatchNormalization(ch)
            self.conv_b = L.Convolution2D(ch, ch, 3, pad=1, nobias=True)
            self.bn_b = L.BatchNormalization(ch)

    def forward(self, x):
        h = F.relu(self.bn_a(self.conv_a(x)))
        return F.relu(x + self.bn_b(self.conv_b(h)))


class ResNet(chainer.Chain):
    """A small residual net with BatchNormalization (inference mode)."""
    in_shape = (2, 6, 6)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv0 = L.Convolution2D(2, 4, 3, pad=1)
            self.bn0 = L.BatchNormalization(4)
            self.block = Block(4)
            self.fc = L.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.conv0(x)))
        h = self.block(h)
        return self.fc(F.average(h, axis=(2, 3)))


class ConvZoo(chainer.Chain):
    """Convolutions with stride, asymmetric pad, dilation and groups, a
    grouped Deconvolution2D and a depthwise grouped convolution."""
    in_shape = (2, 9, 8)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.c1 = L.Convolution2D(2, 6, 3, stride=2, pad=(1, 2),
                                      dilate=2, groups=2)
            self.d1 = L.Deconvolution2D(6, 4, 3, stride=2, pad=1, groups=2)
            self.c2 = L.Convolution2D(4, 4, (2, 3), stride=(1, 2), groups=4)
            self.fc = L.Linear(None, 4)

    def forward(self, x):
        h = F.tanh(self.c1(x))
        h = F.tanh(self.d1(h))
        return self.fc(F.tanh(self.c2(h)))


class Embed(chainer.Chain):
    """EmbedID (with ignore_label) -> Linear over 2 batch axes -> sum."""
    in_shape = (5,)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.emb = L.EmbedID(7, 3, ignore_label=-1)
            self.fc = L.Linear(3, 4)

    def forward(self, ids):
        h = F.tanh(self.emb(ids))
        return F.sum(self.fc(h, n_batch_axes=2), axis=1)


class Shared(chainer.Chain):
    """One Linear called twice (its gradients add over the two calls)."""
    in_shape = (6,)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.sq = L.Linear(6, 6)
            self.out = L.Linear(6, 3)

    def forward(self, x):
        return self.out(F.tanh(self.sq(F.tanh(self.sq(x)))))


class Tied(chainer.Chain):
    """The output layer reuses enc.W transposed outside enc's own call."""
    in_shape = (5,)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.enc = L.Linear(5, 4)
            self.mid = L.Linear(4, 4)

    def forward(self, x):
        h = F.tanh(self.mid(F.tanh(self.enc(x))))
        return F.matmul(h, self.enc.W)


class Scale(chainer.Link):
    """A custom link without a batched rule."""

    def __init__(self, n):
        super().__init__()
        with self.init_scope():
            self.s = chainer.Parameter(
                np.linspace(0.5, 1.5, n).astype(chainer.get_dtype()))

    def forward(self, x):
        return x * F.broadcast_to(self.s, x.shape)


class WithCustom(chainer.Chain):
    """A custom link and L.Bias (links without a batched rule)."""
    in_shape = (6,)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(6, 5)
            self.scale = Scale(5)
            self.shift = L.Bias(shape=(5,))
            self.out = L.Linear(5, 3)

    def forward(self, x):
        return self.out(F.tanh(self.shift(self.scale(F.tanh(self.l1(x))))))


class WithBilinear(chainer.Chain):
    """L.Bilinear (float32 only in Chainer) has no batched rule."""
    in_shape = (6,)

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(6, 5)
            self.bil = L.Bilinear(5, 5, 3)

    def forward(self, x):
        h = F.tanh(self.l1(x))
        return self.bil(h, h)


def build(cls, dtype, n=4, seed=0):
    """Model of ``cls`` in ``dtype``, randomized (BN statistics included),
    and an input batch of n samples."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)      # Chainer's initializers draw from it
    with chainer.using_config('dtype', dtype):
        model = cls()
        if cls is Embed:
            x = rng.integers(-1, 7, size=(n,) + cls.in_shape).astype(np.int32)
        else:
            x = rng.standard_normal((n,) + cls.in_shape).astype(dtype)
        with chainer.using_config('train', False):
            model(x)          # initializes lazy parameters
    randomize_batchnorm(model, rng)
    return model, x


# ---------------------------------------------------------------- oracle

def oracle(model, x, pairs, layout, kind='ce'):
    """Rows for (sample, candidate) pairs by Chainer autograd, one sample at
    a time: cleargrads, loss of that sample, backward, read param.grad."""
    by_path = dict(model.namedlinks())
    params = [getattr(by_path[e.path], e.name) for e in layout.entries]
    rows = []
    for i, c in pairs:
        model.cleargrads()
        with chainer.using_config('train', False):
            z = model(x[i:i + 1])
            if kind == 'ce':
                loss = F.softmax_cross_entropy(z, np.array([c], np.int32))
            else:
                loss = z[0, c]
        loss.backward()
        rows.append(np.concatenate([
            np.zeros(p.size, p.dtype) if p.grad is None else p.grad.ravel()
            for p in params]))
    return np.array(rows)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def n_classes(model, x):
    with chainer.using_config('train', False):
        return model(x[:1]).shape[1]


# ---------------------------------------------------------------- tests

LAYOUT_OPTIONS = {
    MLP: dict(include_bias=True),
    CNN: dict(),
    ResNet: dict(include_batchnorm=True, include_bias=True),
    ConvZoo: dict(include_bias=True, include_deconvolution=True),
    Embed: dict(include_embed_id=True, include_bias=True),
    Shared: dict(include_bias=True),
}


@pytest.mark.parametrize('dtype', DTYPES, ids=['f32', 'f64'])
@pytest.mark.parametrize('cls', list(LAYOUT_OPTIONS), ids=lambda c: c.__name__)
@pytest.mark.parametrize('mode', ['true', 'random', 'all', 'explicit'])
def test_matches_autograd(cls, mode, dtype):
    model, x = build(cls, dtype)
    n = len(x)
    C = n_classes(model, x)
    labels = np.arange(n) % C
    layout = parameter_layout(model, **LAYOUT_OPTIONS[cls])
    candidates = (np.arange(n)[::-1] + 1) % C if mode == 'explicit' else mode
    with warnings.catch_warnings():
        warnings.simplefilter('error', TangentFallbackWarning)
        batch = tangent_features(model, x, labels, candidates, layout=layout,
                                 seed=3)
    rows = n * C if mode == 'all' else n
    assert batch.features.shape == (rows, layout.n_params)
    assert batch.features.dtype == dtype
    assert batch.sample.dtype == np.int64
    if mode == 'all':
        np.testing.assert_array_equal(batch.sample, np.repeat(np.arange(n), C))
        np.testing.assert_array_equal(batch.candidate, np.tile(np.arange(C), n))
    else:
        np.testing.assert_array_equal(batch.sample, np.arange(n))
    if mode == 'true':
        np.testing.assert_array_equal(batch.candidate, labels)
    if mode == 'explicit':
        np.testing.assert_array_equal(batch.candidate, candidates)
    if mode == 'random':
        expect = np.random.default_rng(3).integers(0, C, size=n)
        np.testing.assert_array_equal(batch.candidate, expect)
    np.testing.assert_array_equal(batch.target, labels[batch.sample])
    want = oracle(model, x, zip(batch.sample, batch.candidate), layout)
    assert rel_err(batch.features, want) <= TOL[dtype]


def randomize_batchnorm(model, rng):
    """Non-trivial running statistics and affine parameters for every BN."""
    for _, link in model.namedlinks():
        if isinstance(link, L.BatchNormalization):
            size = link.avg_mean.shape
            link.avg_mean[...] = rng.standard_normal(size)
            link.avg_var[...] = rng.uniform(0.5, 2.0, size)
            link.gamma.array[...] = rng.uniform(0.5, 1.5, size)
            link.beta.array[...] = rng.standard_normal(size)


@pytest.mark.parametrize('arch,in_shape,mode', [
    ('mlp', (1, 28, 28), 'all'),
    ('cnn', (1, 28, 28), 'all'),
    ('cnn', (3, 24, 24), 'random'),
    ('resnet', (3, 12, 12), 'all'),
])
def test_package_models_match_autograd(arch, in_shape, mode):
    """gradnet_cupy.models (float32) with the default paper layout, and the
    residual network with its biases-free convs plus BatchNormalization."""
    rng = np.random.default_rng(7)
    model = build_model(arch, in_shape, 4, seed=1)
    randomize_batchnorm(model, rng)
    x = rng.standard_normal((3,) + in_shape).astype(np.float32)
    layout = parameter_layout(model, include_bias=True,
                              include_batchnorm=True)
    # the weight layers in the models' own forward order
    assert parameter_layout(model).block_paths == \
        tuple('/' + n for n in model.layer_names)
    labels = np.array([0, 3, 1])
    with warnings.catch_warnings():
        warnings.simplefilter('error', TangentFallbackWarning)
        batch = tangent_features(model, x, labels, mode, layout=layout)
    want = oracle(model, x, zip(batch.sample, batch.candidate), layout)
    assert rel_err(batch.features, want) <= TOL[np.float32]


def test_default_layout_is_the_papers_choice():
    model, _ = build(ResNet, np.float32)
    layout = parameter_layout(model)
    assert [(e.path, e.name) for e in layout.entries] == [
        ('/conv0', 'W'), ('/block/conv_a', 'W'), ('/block/conv_b', 'W'),
        ('/fc', 'W')]
    assert layout.block_sizes == (4 * 2 * 9, 4 * 4 * 9, 4 * 4 * 9, 3 * 4)
    assert layout.n_params == sum(layout.block_sizes)
    full = parameter_layout(model, include_bias=True, include_batchnorm=True)
    assert full.block_paths == ('/conv0', '/bn0', '/block/conv_a',
                                '/block/bn_a', '/block/conv_b',
                                '/block/bn_b', '/fc')
    assert [e.name for e in full.entries if e.path == '/bn0'] == \
        ['gamma', 'beta']
    assert [e.name for e in full.entries if e.path == '/fc'] == ['W', 'b']
    offsets = [e.offset for e in full.entries]
    assert offsets == list(np.cumsum([0] + [e.size for e in full.entries])[:-1])


def test_layout_round_trips_through_json():
    model, _ = build(ConvZoo, np.float32)
    layout = parameter_layout(model, include_bias=True,
                              include_deconvolution=True)
    again = ParameterLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    assert again.block_sizes == layout.block_sizes
    broken = layout.to_dict()
    broken['entries'][1]['offset'] += 1
    with pytest.raises(GradnetError, match='inconsistent'):
        ParameterLayout.from_dict(broken)


def test_explicit_links_and_their_errors():
    model, x = build(CNN, np.float32)
    layout = parameter_layout(model, links=['/fc', '/conv2'])
    assert layout.block_paths == ('/conv2', '/fc')   # model order
    with pytest.raises(GradnetError, match="'/conv9' is not in the model"):
        parameter_layout(model, links=['/conv9'])
    with pytest.raises(GradnetError, match='no parameters of its own'):
        parameter_layout(build(ResNet, np.float32)[0], links=['/block'])
    other, _ = build(MLP, np.float32)
    with pytest.raises(GradnetError, match='not in the model'):
        tangent_features(other, np.zeros((2,) + MLP.in_shape, np.float32),
                         layout=layout)


@pytest.mark.parametrize('dtype', DTYPES, ids=['f32', 'f64'])
@pytest.mark.parametrize('cls', [CNN, ResNet, ConvZoo])
def test_logit_jacobian_matches_autograd(cls, dtype):
    model, x = build(cls, dtype, n=3)
    layout = parameter_layout(model, **LAYOUT_OPTIONS[cls])
    jac = logit_jacobian(model, x, layout=layout)
    n, C = len(x), n_classes(model, x)
    assert jac.shape == (n, C, layout.n_params)
    pairs = [(i, k) for i in range(n) for k in range(C)]
    want = oracle(model, x, pairs, layout, kind='jacobian')
    assert rel_err(jac.reshape(n * C, -1), want) <= TOL[dtype]
    # CE rows are (softmax - e_c) combinations of the Jacobian rows
    with chainer.using_config('train', False):
        p = F.softmax(model(x)).array
    ce = tangent_features(model, x, candidates='all', layout=layout).features
    combined = np.einsum('ik,ikp->ip', p, jac)[:, None, :] - jac
    assert rel_err(ce, combined.reshape(n * C, -1)) <= TOL[dtype]


CHUNK_TOL = {np.float32: 1e-6, np.float64: 1e-13}


@pytest.mark.parametrize('dtype', DTYPES, ids=['f32', 'f64'])
@pytest.mark.parametrize('mode', ['all', 'random'])
def test_chunking_matches_one_chunk(mode, dtype):
    """Chunks hold the same rows and metadata as one chunk. The features
    agree to rounding, not bit for bit: Chainer's own forward pass (BLAS
    blocking) already differs in the last bit between batch sizes."""
    model, x = build(ResNet, dtype, n=5)
    labels = np.arange(5) % 3
    layout = parameter_layout(model, include_bias=True,
                              include_batchnorm=True)
    rows = 3 if mode == 'all' else 1
    budget = 3 * rows * layout.n_params * x.itemsize
    whole = tangent_features(model, x, labels, mode, layout=layout,
                             max_bytes=None)
    chunks = list(iter_tangent_features(model, x, labels, mode,
                                        layout=layout, max_bytes=budget))
    assert len(chunks) >= 2
    for c in chunks:
        assert len(c.features) % rows == 0 and c.features.nbytes <= budget
    for got, want in zip(list(zip(*chunks))[1:], whole[1:]):
        np.testing.assert_array_equal(np.concatenate(got), want)
    chunked = np.concatenate([c.features for c in chunks])
    assert rel_err(chunked, whole.features) <= CHUNK_TOL[dtype]
    reused = iter_tangent_features(model, x, labels, mode, layout=layout,
                                   max_bytes=budget, reuse_buffer=True)
    # a reused buffer gives the same values as fresh chunks, bit for bit
    np.testing.assert_array_equal(
        np.concatenate([c.features.copy() for c in reused]), chunked)
    jac_chunks = list(iter_logit_jacobian(model, x, labels, layout=layout,
                                          max_bytes=1))
    assert len(jac_chunks) == 5
    jac = np.concatenate([c.features for c in jac_chunks])
    np.testing.assert_array_equal(
        np.concatenate([c.candidate for c in jac_chunks]), np.tile(range(3), 5))
    np.testing.assert_array_equal(
        np.concatenate([c.target for c in jac_chunks]), np.repeat(labels, 3))
    jac_whole = logit_jacobian(model, x, layout=layout, max_bytes=None)
    assert rel_err(jac, jac_whole.reshape(15, -1)) <= CHUNK_TOL[dtype]


def test_threads_split_samples_not_results():
    """Sub-batches in threads give the rows of the unthreaded path."""
    model, x = build(CNN, np.float64, n=5)
    one = tangent_features(model, x, candidates='all', n_threads=1)
    three = tangent_features(model, x, candidates='all', n_threads=3)
    for a, b in zip(one[1:], three[1:]):
        np.testing.assert_array_equal(a, b)
    assert rel_err(three.features, one.features) <= CHUNK_TOL[np.float64]
    with pytest.raises(GradnetError, match='n_threads must be at least 1'):
        tangent_features(model, x, n_threads=0)


def test_weight_decay_adds_wd_times_theta():
    model, x = build(MLP, np.float64)
    layout = parameter_layout(model, include_bias=True)
    plain = tangent_features(model, x, candidates='all', layout=layout)
    decayed = tangent_features(model, x, candidates='all', layout=layout,
                               weight_decay=5e-4)
    theta = np.concatenate([getattr(dict(model.namedlinks())[e.path],
                                    e.name).array.ravel()
                            for e in layout.entries])
    np.testing.assert_allclose(decayed.features - plain.features,
                               np.broadcast_to(5e-4 * theta,
                                               plain.features.shape),
                               rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize('cls,links,dtype,expected', [
    (WithCustom, ['/l1', '/scale', '/shift', '/out'], np.float32,
     ['/scale', '/shift']),
    (WithCustom, ['/l1', '/scale', '/shift', '/out'], np.float64,
     ['/scale', '/shift']),
    (WithBilinear, ['/l1', '/bil'], np.float32, ['/bil']),
    (Tied, None, np.float32, ['/enc']),     # enc.W also used outside enc()
    (Tied, None, np.float64, ['/enc']),
], ids=['custom-f32', 'custom-f64', 'bilinear-f32', 'tied-f32', 'tied-f64'])
def test_fallback_is_correct_warns_and_strict_raises(cls, links, dtype,
                                                     expected):
    model, x = build(cls, dtype, n=3)
    layout = parameter_layout(model, include_bias=True, links=links)
    with pytest.warns(TangentFallbackWarning) as record:
        batch = tangent_features(model, x, candidates='all', layout=layout)
    messages = ' '.join(str(w.message) for w in record)
    for path in layout.block_paths:
        assert (repr(path) in messages) == (path in expected)
    n, C = len(x), n_classes(model, x)
    pairs = [(i, c) for i in range(n) for c in range(C)]
    assert rel_err(batch.features, oracle(model, x, pairs, layout)) \
        <= TOL[dtype]
    with pytest.raises(GradnetError, match='strict=True'):
        tangent_features(model, x, candidates='all', layout=layout,
                         strict=True)


def test_bad_input_raises_gradnet_error():
    model, x = build(MLP, np.float32)
    with pytest.raises(GradnetError, match=r'labels must have shape \(4,\)'):
        tangent_features(model, x, np.zeros(3, np.int64))
    with pytest.raises(GradnetError, match=r'labels must lie in \[0, 5\)'):
        tangent_features(model, x, np.array([0, 1, 5, 2]))
    with pytest.raises(GradnetError, match=r'candidates must lie in'):
        tangent_features(model, x, candidates=np.array([0, -1, 2, 2]))
    with pytest.raises(GradnetError, match='must be integers'):
        tangent_features(model, x, np.zeros(4))
    with pytest.raises(GradnetError, match="candidates='true' needs labels"):
        tangent_features(model, x, candidates='true')
    with pytest.raises(GradnetError, match='unknown candidates mode'):
        tangent_features(model, x, candidates='every')
    with pytest.raises(GradnetError, match='at least one sample'):
        tangent_features(model, x[:0])
    with pytest.raises(GradnetError, match='max_bytes must be positive'):
        tangent_features(model, x, max_bytes=0)
    with pytest.raises(GradnetError, match='NumPy or CuPy array'):
        iter_tangent_features(model, list(x))
    cnn, xc = build(CNN, np.float32)
    with pytest.raises(GradnetError, match='must return logits'):
        tangent_features(cnn.conv1, xc)
