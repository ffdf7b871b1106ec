"""Base networks: Chainer Chains that map images to logits.

Every model takes float32 input of shape (B, C, H, W) = (B, *in_shape) and
returns float32 logits (B, n_classes). All input sizes are fixed at
construction (no lazy ``None`` sizes), so parameter shapes and counts are
known before the first forward pass. Each model has the attributes

* ``arch``        -- its registry name,
* ``in_shape``    -- (C, H, W),
* ``n_classes``   -- number of outputs,
* ``layer_names`` -- the paths (e.g. ``'conv1'`` or ``'block1/conv2'``,
  as in ``model.namedlinks()`` without the leading '/'; resolve one with
  :func:`get_link`) of its weight layers (Convolution2D and Linear, each
  with a ``W``) in forward order.

Link names are stable: the tangent layout and the HDF5 store record them.
Weights are drawn from ``numpy.random.RandomState(seed)`` (LeCun normal, He
normal for the residual network), so a seed fixes the initial model without
touching global random state.
"""
import numpy as np

from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.errors import GradnetError


def _pooled(size):
    """Output size of max_pooling_2d(ksize=2) with Chainer's cover_all=True."""
    return chainer.utils.conv.get_conv_outsize(size, 2, 2, 0, cover_all=True)


class BaseNet(chainer.Chain):
    """Records ``in_shape`` and ``n_classes`` (not serialized)."""

    def __init__(self, in_shape, n_classes):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.n_classes = n_classes


class CNN(BaseNet):
    """The original base CNN of the paper.

    conv1: Conv 64 5x5 pad 1 -> ReLU -> maxpool 2 -> conv2: Conv 64 5x5 pad 2
    -> ReLU -> maxpool 2 -> fc: Linear(n_classes). On 3x24x24 input the
    weights are 4,800 / 102,400 / 23,040.
    """
    arch = 'cnn'
    layer_names = ('conv1', 'conv2', 'fc')

    def __init__(self, in_shape, n_classes, rng):
        super().__init__(in_shape, n_classes)
        channels, height, width = in_shape
        if min(height, width) < 3:
            raise GradnetError(f'cnn needs images of at least 3x3, got '
                               f'in_shape {tuple(in_shape)}')
        # conv1 (5x5, pad 1) shrinks by 2, conv2 (5x5, pad 2) keeps the size.
        h, w = _pooled(_pooled(height - 2)), _pooled(_pooled(width - 2))
        with self.init_scope():
            self.conv1 = L.Convolution2D(channels, 64, 5, pad=1,
                                         initialW=_lecun(rng))
            self.conv2 = L.Convolution2D(64, 64, 5, pad=2, initialW=_lecun(rng))
            self.fc = L.Linear(64 * h * w, n_classes, initialW=_lecun(rng))

    def forward(self, x):
        h = F.max_pooling_2d(F.relu(self.conv1(x)), 2)
        h = F.max_pooling_2d(F.relu(self.conv2(h)), 2)
        return self.fc(h)


class MLP(BaseNet):
    """Fully connected 256-128-64-32-n_classes with ReLU (fc1 .. fc5)."""
    arch = 'mlp'
    hidden = (256, 128, 64, 32)
    layer_names = ('fc1', 'fc2', 'fc3', 'fc4', 'fc5')

    def __init__(self, in_shape, n_classes, rng):
        super().__init__(in_shape, n_classes)
        sizes = (int(np.prod(in_shape)),) + self.hidden + (n_classes,)
        with self.init_scope():
            for name, n_in, n_out in zip(self.layer_names, sizes, sizes[1:]):
                setattr(self, name, L.Linear(n_in, n_out, initialW=_lecun(rng)))

    def forward(self, x):
        h = x
        for name in self.layer_names[:-1]:
            h = F.relu(self[name](h))
        return self[self.layer_names[-1]](h)


class ResBlock(chainer.Chain):
    """Basic residual block: conv1 3x3 (stride) -> bn1 -> ReLU -> conv2 3x3
    -> bn2, plus the input (through proj 1x1 + bnp when the shape changes),
    then ReLU. Convolutions have no bias (batch normalization follows)."""

    def __init__(self, n_in, n_out, stride, rng):
        super().__init__()
        self.has_proj = stride != 1 or n_in != n_out
        self.layer_names = ('conv1', 'conv2') + (
            ('proj',) if self.has_proj else ())
        with self.init_scope():
            self.conv1 = L.Convolution2D(n_in, n_out, 3, stride, 1, nobias=True,
                                         initialW=_he(rng))
            self.bn1 = L.BatchNormalization(n_out)
            self.conv2 = L.Convolution2D(n_out, n_out, 3, 1, 1, nobias=True,
                                         initialW=_he(rng))
            self.bn2 = L.BatchNormalization(n_out)
            if self.has_proj:
                self.proj = L.Convolution2D(n_in, n_out, 1, stride, 0,
                                            nobias=True, initialW=_he(rng))
                self.bnp = L.BatchNormalization(n_out)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = self.bnp(self.proj(x)) if self.has_proj else x
        return F.relu(h + shortcut)


class ResNet(BaseNet):
    """A small residual network with batch normalization.

    conv0 3x3 16 -> bn0 -> ReLU -> block1 (16, stride 1) -> block2 (32,
    stride 2) -> block3 (64, stride 2) -> global average pool -> fc.
    """
    arch = 'resnet'
    stages = ((16, 1), (32, 2), (64, 2))

    def __init__(self, in_shape, n_classes, rng):
        super().__init__(in_shape, n_classes)
        channels = in_shape[0]
        with self.init_scope():
            self.conv0 = L.Convolution2D(channels, 16, 3, 1, 1, nobias=True,
                                         initialW=_he(rng))
            self.bn0 = L.BatchNormalization(16)
            n_in = 16
            for i, (n_out, stride) in enumerate(self.stages, 1):
                setattr(self, f'block{i}', ResBlock(n_in, n_out, stride, rng))
                n_in = n_out
            self.fc = L.Linear(n_in, n_classes, initialW=_lecun(rng))
        self.layer_names = (('conv0',) + tuple(
            f'block{i}/{name}' for i in range(1, len(self.stages) + 1)
            for name in self[f'block{i}'].layer_names) + ('fc',))

    def forward(self, x):
        h = F.relu(self.bn0(self.conv0(x)))
        for i in range(1, len(self.stages) + 1):
            h = self[f'block{i}'](h)
        return self.fc(F.average(h, axis=(2, 3)))


def _lecun(rng):
    return chainer.initializers.LeCunNormal(rng=rng)


def _he(rng):
    return chainer.initializers.HeNormal(rng=rng)


def get_link(model, path):
    """The link of ``model`` at ``path`` ('fc' or 'block1/conv2')."""
    link = model
    for name in path.split('/'):
        link = link[name]
    return link


def model_to_device(model, device):
    """Move ``model`` to 'cpu' or 'gpu' (CuPy's current device: 0 unless a
    caller chose another, as ``--mpi`` does per rank) in place; return it.

    Raises :class:`GradnetError` when Chainer cannot use CuPy (CuPy or one
    of the CUDA libraries it loads is missing).
    """
    if device == 'gpu':
        cuda = chainer.backends.cuda
        if not cuda.available:
            raise GradnetError('Chainer cannot use CuPy: '
                               f"{getattr(cuda, '_resolution_error', None)}")
        model.to_device(f'@cupy:{cuda.cupy.cuda.Device().id}')
    else:
        model.to_cpu()
    return model


MODELS = {'cnn': CNN, 'mlp': MLP, 'resnet': ResNet}


def build_model(name, in_shape, n_classes, seed=0):
    """A freshly initialised model ``name`` (one of :data:`MODELS`).

    ``in_shape``: (C, H, W) of the input; ``n_classes``: number of logits;
    ``seed``: int, fixes the initial weights. Raises :class:`GradnetError`
    for an unknown name or bad shape.
    """
    if name not in MODELS:
        raise GradnetError(f"unknown model {name!r}: choose one of "
                           f"{', '.join(MODELS)}")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise GradnetError(f'in_shape must be (C, H, W) of positive sizes, '
                           f'got {in_shape}')
    if n_classes < 2:
        raise GradnetError(f'n_classes must be at least 2, got {n_classes}')
    return MODELS[name](in_shape, n_classes, np.random.RandomState(seed))
