"""Training the base network on the base half of a dataset.

:func:`train_base` trains a model from :mod:`gradnet_cupy.models` with plain
SGD or MomentumSGD on ``dataset.base`` (through ``dataset.train_transform``),
evaluates it on ``dataset.test`` after every epoch and writes, in ``out``:

* ``base.json``             -- the run's configuration: dataset, data_dir,
  subset, model, in_shape, n_classes, seed and the optimizer settings;
* ``snapshot_epoch_<k>.npz`` -- the model after epoch k (Chainer npz);
* ``snapshots.json``        -- a list of ``{epoch, train_loss,
  test_accuracy, path}``, ``path`` relative to ``out``.

Every file is written to a temporary file in ``out`` and renamed into place
(``os.replace``), so an interrupted run never leaves a partial file under a
final name. :func:`load_base` rebuilds a trained model from ``out``.
"""
import glob
import json
import os
import sys
import zipfile

import numpy as np
from tqdm import tqdm

from gradnet_cupy import backend
from gradnet_cupy.chainer_compat import chainer, F
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.files import atomic_write
from gradnet_cupy.models import build_model, model_to_device

BASE_OPTIMIZERS = ('sgd', 'momentum')
CONFIG_FILE = 'base.json'
SNAPSHOTS_FILE = 'snapshots.json'
EVAL_BATCH = 500


def snapshot_name(epoch):
    """File name of the snapshot after ``epoch`` (1-based)."""
    return f'snapshot_epoch_{epoch}.npz'


def train_base(dataset, model_name, out, epochs=10, batch=32, lr=0.01,
               momentum=0.9, weight_decay=0.0, optimizer='momentum',
               stop_at_accuracy=None, seed=0, device='cpu', overwrite=False,
               progress=True, data_dir=None, subset=None):
    """Train base network ``model_name`` on ``dataset`` (a data.Dataset).

    ``device``: 'cpu' or 'gpu' (already resolved). ``stop_at_accuracy``:
    stop after the first epoch whose test accuracy is >= it. ``seed`` fixes
    the initial weights, the shuffling and the augmentation. ``overwrite``
    allows an ``out`` that already holds a run (its files are removed first).
    ``data_dir``/``subset`` are only recorded in base.json. ``progress``
    shows a tqdm bar and one line per epoch on stderr.

    Returns a summary dict: dataset, model, out, device, n_params,
    epochs_run, train_loss, test_accuracy (of the last epoch), snapshot
    (its path) and snapshots (the snapshots.json records).
    """
    _check_settings(epochs, batch, lr, momentum, weight_decay, optimizer,
                    stop_at_accuracy)
    _prepare_out(out, overwrite)
    model = model_to_device(build_model(model_name, dataset.in_shape,
                                        dataset.n_classes, seed), device)
    opt = (chainer.optimizers.SGD(lr=lr) if optimizer == 'sgd' else
           chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum))
    opt.setup(model)
    if weight_decay > 0:
        opt.add_hook(chainer.optimizer_hooks.WeightDecay(weight_decay))
    _write_json(os.path.join(out, CONFIG_FILE), {
        'dataset': dataset.name, 'data_dir': data_dir, 'subset': subset,
        'source': dataset.source, 'model': model_name,
        'in_shape': list(dataset.in_shape), 'n_classes': dataset.n_classes,
        'seed': seed, 'optimizer': optimizer, 'lr': lr, 'momentum': momentum,
        'weight_decay': weight_decay, 'batch': batch})

    rng = np.random.default_rng(seed)
    records = []
    for epoch in range(1, epochs + 1):
        train_loss = _train_epoch(model, opt, dataset, batch, rng, device,
                                  f'epoch {epoch}/{epochs}', progress)
        accuracy = evaluate(model, dataset.test, dataset.eval_transform, device)
        name = snapshot_name(epoch)
        save_snapshot(model, os.path.join(out, name))
        records.append({'epoch': epoch, 'train_loss': train_loss,
                        'test_accuracy': accuracy, 'path': name})
        _write_json(os.path.join(out, SNAPSHOTS_FILE), records)
        if progress:
            tqdm.write(f'epoch {epoch}: train loss {train_loss:.4f}, '
                       f'test accuracy {accuracy:.4f}', file=sys.stderr)
        if stop_at_accuracy is not None and accuracy >= stop_at_accuracy:
            break
    last = records[-1]
    return {'dataset': dataset.name, 'model': model_name, 'out': out,
            'device': device, 'n_params': int(model.count_params()),
            'epochs_run': last['epoch'], 'train_loss': last['train_loss'],
            'test_accuracy': last['test_accuracy'],
            'snapshot': os.path.join(out, last['path']), 'snapshots': records}


def _check_settings(epochs, batch, lr, momentum, weight_decay, optimizer,
                    stop_at_accuracy):
    checks = [
        (epochs >= 1, f'epochs must be >= 1, got {epochs}'),
        (batch >= 1, f'batch must be >= 1, got {batch}'),
        (lr > 0, f'lr must be > 0, got {lr}'),
        (0 <= momentum < 1, f'momentum must be in [0, 1), got {momentum}'),
        (weight_decay >= 0, f'weight decay must be >= 0, got {weight_decay}'),
        (optimizer in BASE_OPTIMIZERS,
         f'unknown optimizer {optimizer!r}: choose one of '
         f"{', '.join(BASE_OPTIMIZERS)}"),
        (stop_at_accuracy is None or 0 < stop_at_accuracy <= 1,
         f'stop-at-accuracy must be in (0, 1], got {stop_at_accuracy}'),
    ]
    for ok, message in checks:
        if not ok:
            raise GradnetError(message)


def _prepare_out(out, overwrite):
    """Create ``out``; refuse (or, with ``overwrite``, clear) a previous run."""
    os.makedirs(out, exist_ok=True)
    previous = [os.path.join(out, name) for name in (CONFIG_FILE,
                                                     SNAPSHOTS_FILE)]
    previous = [p for p in previous if os.path.exists(p)] + glob.glob(
        os.path.join(out, snapshot_name('*')))
    if previous and not overwrite:
        raise GradnetError(f'{out} already holds a training run '
                           f'({os.path.basename(previous[0])}); choose another '
                           f'--out or pass --overwrite')
    for path in previous:
        os.remove(path)


def _train_epoch(model, opt, dataset, batch, rng, device, desc, progress):
    """One pass over dataset.base in a random order; returns the mean loss."""
    x, y = dataset.base
    order = rng.permutation(len(x))
    total = 0.0
    with chainer.using_config('train', True), tqdm(
            total=len(x), desc=desc, unit='img', leave=False, file=sys.stderr,
            disable=None if progress else True) as bar:
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            xb = backend.to_device(dataset.train_transform(x[idx], rng), device)
            yb = backend.to_device(y[idx], device)
            loss = F.softmax_cross_entropy(model(xb), yb)
            model.cleargrads()
            loss.backward()
            opt.update()
            total += float(loss.array) * len(idx)
            bar.update(len(idx))
            bar.set_postfix(loss=f'{float(loss.array):.4f}', refresh=False)
    return total / len(x)


def predict(model, x, transform, device, batch=EVAL_BATCH):
    """Logits of ``model`` in test mode: x float32 (N, C, H, W) NumPy ->
    float32 (N, n_classes) NumPy, ``transform`` applied per batch."""
    outputs = []
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, len(x), batch):
            xb = backend.to_device(transform(x[start:start + batch]), device)
            outputs.append(backend.to_numpy(model(xb).array))
    return np.concatenate(outputs)


def evaluate(model, split, transform, device):
    """Accuracy (float in [0, 1]) of ``model`` on ``split`` = (x, y)."""
    x, y = split
    return float((predict(model, x, transform, device).argmax(1) == y).mean())


# ----------------------------------------------------------------- files

def _write_json(path, obj):
    atomic_write(path, lambda f: f.write(
        (json.dumps(obj, indent=1) + '\n').encode()))


def save_snapshot(model, path):
    """Write ``model``'s parameters and persistents to ``path`` (Chainer npz)
    atomically."""
    atomic_write(path, lambda f: chainer.serializers.save_npz(f, model))


def load_snapshot(model, path):
    """Load snapshot ``path`` into ``model`` in place and return ``model``.

    Raises :class:`GradnetError` when the file is missing or unreadable, or
    when its arrays do not match the model: keys missing from the file,
    keys the model does not have, or shapes that differ.
    """
    expected = chainer.serializers.DictionarySerializer()
    expected.save(model)
    try:
        with np.load(path) as npz:
            stored = {key: npz[key].shape for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise GradnetError(f'{path}: not a readable snapshot ({e})') from e
    problems = []
    missing = sorted(set(expected.target) - set(stored))
    unexpected = sorted(set(stored) - set(expected.target))
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    for key in sorted(set(stored) & set(expected.target)):
        want = np.shape(expected.target[key])
        if stored[key] != want:
            problems.append(f'{key} has shape {stored[key]}, model needs '
                            f'{want}')
    if problems:
        raise GradnetError(
            f'{path} does not match model {getattr(model, "arch", "?")} '
            f'with {getattr(model, "n_classes", "?")} classes: '
            + '; '.join(problems))
    chainer.serializers.load_npz(path, model)
    return model


def read_snapshots(out):
    """The records of ``<out>/snapshots.json`` with ``path`` made absolute."""
    path = os.path.join(out, SNAPSHOTS_FILE)
    records = _read_json(path)
    if not isinstance(records, list) or not records:
        raise GradnetError(f'{path} holds no snapshot records')
    return [{**r, 'path': os.path.join(os.path.abspath(out), r['path'])}
            for r in records]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise GradnetError(f'{path}: cannot read ({e})') from e


def load_base(out, epoch=None, device='cpu'):
    """Rebuild the base model trained into ``out``.

    ``epoch``: which snapshot (default: the last one written). Returns
    ``(model, config, record)``: the model with the snapshot loaded (on
    ``device``), the base.json dict, and the snapshots.json record.
    """
    config = _read_json(os.path.join(out, CONFIG_FILE))
    records = read_snapshots(out)
    if epoch is None:
        record = records[-1]
    else:
        matching = [r for r in records if r['epoch'] == epoch]
        if not matching:
            raise GradnetError(f'{out} has no snapshot of epoch {epoch} '
                               f"(epochs {', '.join(str(r['epoch']) for r in records)})")
        record = matching[0]
    model = build_model(config['model'], config['in_shape'],
                        config['n_classes'], config['seed'])
    load_snapshot(model, record['path'])
    return model_to_device(model, device), config, record
