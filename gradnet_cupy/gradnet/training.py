"""Training GradNet: optimizers, one update, the loop, and the
all-candidates accuracy.

Neighbours: :mod:`.model` (the network and its prediction rule),
:mod:`.sources` (what feeds :func:`train` and :func:`evaluate_candidates`),
:mod:`.pipelines` (which wires them together).
"""
import sys

import numpy as np
from tqdm import tqdm

from gradnet_cupy.backend import to_numpy
from gradnet_cupy.chainer_compat import chainer, F
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.gradnet.model import (candidate_outputs,
                                        predict_from_candidates)
from gradnet_cupy.scaleout.parallel import SINGLE

GRADNET_OPTIMIZERS = ('sgd', 'momentum', 'adam')


def check_optimizer(name):
    """Raises :class:`GradnetError` unless ``name`` is one of
    :data:`GRADNET_OPTIMIZERS`."""
    if name not in GRADNET_OPTIMIZERS:
        raise GradnetError(f"unknown optimizer {name!r}: choose one of "
                           f"{', '.join(GRADNET_OPTIMIZERS)}")


def make_optimizer(model, name='sgd', lr=0.01, momentum=0.9,
                   weight_decay=0.0):
    """A Chainer optimizer set up on ``model`` (the original: plain SGD,
    lr 0.01)."""
    check_optimizer(name)
    if name == 'sgd':
        optimizer = chainer.optimizers.SGD(lr=lr)
    elif name == 'momentum':
        optimizer = chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum)
    else:
        optimizer = chainer.optimizers.Adam(alpha=lr)
    optimizer.setup(model)
    if weight_decay:
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(weight_decay))
    return optimizer


def train_step(model, optimizer, csr, target, weight=None):
    """One update on a CSR batch with true-label cross-entropy; returns the
    batch loss (float). ``target``: (rows,) int32 in the batch's module.
    ``weight``: None (the loss is the mean over the rows) or float32
    (rows,) per-row weights of the summed loss (a data-parallel rank's
    share of a global batch, :mod:`gradnet_cupy.scaleout.training`)."""
    with chainer.using_config('train', True):
        if weight is None:
            loss = F.softmax_cross_entropy(model(csr), target)
        else:
            loss = F.sum(weight * F.softmax_cross_entropy(
                model(csr), target, reduce='no'))
    model.cleargrads()
    loss.backward()
    optimizer.update()
    return float(loss.array)


def evaluate_candidates(model, batches, normalizer=None):
    """Accuracy of the all-candidates prediction rule over ``batches``.

    ``batches`` yields ``(csr, sample, target)`` with every candidate row of
    each sample somewhere in the stream. Returns ``(accuracy, samples,
    predicted, true)`` with NumPy arrays, one entry per sample.
    """
    outputs, samples, targets = [], [], []
    for csr, sample, target in batches:
        if normalizer is not None:
            csr = normalizer(csr)
        outputs.append(to_numpy(candidate_outputs(model, csr)))
        samples.append(to_numpy(sample))
        targets.append(to_numpy(target))
    if not outputs:
        raise GradnetError('nothing to evaluate: the test data has no rows')
    sample = np.concatenate(samples)
    ids, predicted = predict_from_candidates(np.concatenate(outputs), sample)
    truth = np.zeros(ids.shape[0], dtype=np.int64)
    truth[np.searchsorted(ids, sample)] = np.concatenate(targets)
    return float(np.mean(predicted == truth)), ids, predicted, truth


def train(model, optimizer, epochs, epoch_batches, evaluate_test,
          eval_every=None, progress=True, start=None, after_epoch=None,
          parallel=SINGLE):
    """The GradNet training loop.

    ``epoch_batches(epoch)`` yields ``(csr, target)`` training batches
    (already normalized, on the model's device); ``evaluate_test()`` returns
    the test accuracy. The test set is evaluated every ``eval_every``
    iterations (None: after every epoch; 0: only at the end) and at the
    end. Returns the history:
    a list of ``{iteration, epoch, train_loss, test_accuracy}`` dicts, where
    ``train_loss`` is the mean batch loss since the previous evaluation.
    ``after_epoch(state)``, when given, is called after every epoch with
    the loop's state (JSON-able: ``epoch``, ``iteration``, ``history``,
    ``losses``); ``start``, such a state, goes on after its epoch.
    Data-parallel (``parallel``: the ranks, a
    :class:`~gradnet_cupy.scaleout.Parallel`): batches may carry a third
    item, the per-row loss weights of :func:`train_step`, and each batch
    loss recorded is the mean over the ranks.
    """
    start = start or {'epoch': 0, 'iteration': 0, 'history': [],
                      'losses': []}
    history, losses = list(start['history']), list(start['losses'])
    iteration = start['iteration']

    def record(epoch):
        history.append({'iteration': iteration, 'epoch': epoch,
                        'train_loss': float(np.mean(losses)) if losses
                        else None,
                        'test_accuracy': evaluate_test()})
        losses.clear()
        if progress:
            tqdm.write(f"iteration {iteration} (epoch {epoch}): train loss "
                       f"{history[-1]['train_loss']:.4f}, test accuracy "
                       f"{history[-1]['test_accuracy']:.4f}",
                       file=sys.stderr)

    for epoch in range(start['epoch'] + 1, epochs + 1):
        for csr, target, *weight in tqdm(epoch_batches(epoch),
                                         disable=None if progress else True,
                                         desc=f'epoch {epoch}', unit='batch',
                                         leave=False):
            losses.append(parallel.mean(
                train_step(model, optimizer, csr, target, *weight)))
            iteration += 1
            if eval_every and iteration % eval_every == 0:
                record(epoch)
        if eval_every is None:
            record(epoch)
        if after_epoch is not None:
            after_epoch({'epoch': epoch, 'iteration': iteration,
                         'history': history, 'losses': losses})
    if not history or history[-1]['iteration'] != iteration:
        record(epochs)
    return history
