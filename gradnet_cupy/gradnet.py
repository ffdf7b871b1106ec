"""GradNet: a shallow block-structured network over sparse tangent features.

The input is a CSR batch of tangent features (rows x n_columns, float32) whose
columns are split into contiguous blocks, one per base-network layer (the
``block_sizes`` of the parameter layout). The first layer is block-structured:
hidden sub-block ``b`` (ReLU) sees only the columns of input block ``b``
(wiring ``diagonal``, the original code) or of blocks ``b`` and ``b + 1``
(wiring ``adjacent``). The concatenated hidden layer feeds a Linear to the
classes. The first layer is computed sparsely (CSR x dense per block, SciPy on
the CPU, cupyx on the GPU) and its weight gradient is ``gy^T X``.

Prediction (DESIGN §1.6): ``argmax_c sum_ĉ GradNet(t(x, ĉ))_c``, the raw
outputs summed over all candidate rows of a sample
(:func:`predict_from_candidates`).
"""
import json
import os
import sys
import warnings

import numpy as np
from tqdm import tqdm

from gradnet_cupy.backend import get_array_module, to_device, to_numpy
from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.extract import candidate_plan, iter_sparse_tangents
from gradnet_cupy.metric import MetricNormalizer, load_store_metric
from gradnet_cupy.normalize import METHODS, ColumnStats, Normalizer
from gradnet_cupy.models import to_device as to_device_model
from gradnet_cupy.store import TangentStore
from gradnet_cupy.tangent import ParameterLayout
from gradnet_cupy.train_base import atomic_write, load_snapshot, save_snapshot

WIRINGS = ('diagonal', 'adjacent')
# the column-wise methods of normalize.py and the block whitening of metric.py
NORMALIZATIONS = METHODS + ('metric',)


def proportional_hidden_sizes(block_sizes, total):
    """Split ``total`` hidden units over blocks in proportion to their sizes.

    Every block gets at least one unit; the rounding remainder goes to the
    largest blocks. Returns a list of ints summing to ``max(total, n_blocks)``.
    """
    sizes = np.asarray(block_sizes, dtype=np.float64)
    total = max(int(total), len(sizes))
    share = np.maximum(1, np.floor(sizes / sizes.sum() * total)).astype(int)
    for b in np.argsort(-sizes, kind='stable'):
        if share.sum() >= total:
            break
        share[b] += 1
    while share.sum() > total:
        share[np.argmax(share)] -= 1
    return share.tolist()


def column_ranges(block_sizes, wiring):
    """The input column range ``(start, stop)`` each hidden block sees.

    ``diagonal``: block b's own columns; ``adjacent``: blocks b and b + 1
    (the last block sees only itself). Blocks are contiguous, so either way
    a hidden block reads one contiguous column range.
    """
    if wiring not in WIRINGS:
        raise GradnetError(
            f"unknown wiring {wiring!r}: choose one of {', '.join(WIRINGS)}")
    offsets = np.concatenate([[0], np.cumsum(block_sizes)]).astype(int)
    n_blocks = len(block_sizes)
    ranges = []
    for b in range(n_blocks):
        last = b + 1 if wiring == 'diagonal' else min(b + 2, n_blocks)
        ranges.append((int(offsets[b]), int(offsets[last])))
    return ranges


def to_sparse_matrix(csr):
    """A SciPy (NumPy arrays) or cupyx (CuPy arrays) csr_matrix of a CSR."""
    xp = get_array_module(csr.data)
    if xp is np:
        import scipy.sparse as sparse
    else:
        import cupyx.scipy.sparse as sparse
    return sparse.csr_matrix((csr.data, csr.indices, csr.indptr),
                             shape=tuple(csr.shape))


class _SparseMatMul(chainer.function_node.FunctionNode):
    """``y = X W`` for a constant sparse ``X`` (rows x k) and a dense,
    C-contiguous ``W`` (k x h); the gradient flows to ``W`` only:
    ``gW = X^T gy``, C-contiguous (k x h) as computed, so that neither pass
    copies the k x h matrix."""

    def __init__(self, x):
        self.x = x

    def forward(self, inputs):
        W, = inputs
        return (self.x @ W).astype(W.dtype, copy=False),

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        gW = (self.x.T @ gy.array).astype(gy.dtype, copy=False)
        return chainer.Variable(gW),


def sparse_matmul(x, W):
    """``x @ W`` as a Chainer Variable; ``x`` a scipy/cupyx sparse matrix
    (rows x k), ``W`` a Variable (k x h). Returns (rows x h)."""
    return _SparseMatMul(x).apply((W,))[0]


class GradNet(chainer.Chain):
    """The GradNet model over CSR tangent features.

    Args:
        block_sizes: column count of each input block (the base network's
            layers, in layout order); they sum to the number of columns.
        hidden_sizes: hidden units per block (same length as block_sizes).
        n_classes: number of output classes.
        wiring: ``'diagonal'`` or ``'adjacent'`` (see :func:`column_ranges`).
        dropout: dropout ratio on the hidden layer (0 disables it).
        batchnorm: batch normalization on the hidden layer before ReLU.
        seed: seed of the initial weights.

    ``forward(csr)`` takes a :class:`gradnet_cupy.kernels.CSR` with float32
    data and returns logits (rows x n_classes) as a Variable.

    Parameters: ``W{b}`` (columns of block b x hidden units of block b),
    input-major, i.e. hidden block b is ``relu(x_b @ W{b} + b{b})``;
    ``b{b}`` (hidden units,); ``out``, the Linear to the classes.
    """

    def __init__(self, block_sizes, hidden_sizes, n_classes,
                 wiring='diagonal', dropout=0.0, batchnorm=False, seed=0):
        super().__init__()
        block_sizes = [int(s) for s in block_sizes]
        hidden_sizes = [int(h) for h in hidden_sizes]
        if len(hidden_sizes) != len(block_sizes):
            raise GradnetError(
                f'{len(hidden_sizes)} hidden sizes given for '
                f'{len(block_sizes)} input blocks: give one per block')
        if min(block_sizes + hidden_sizes) < 1:
            raise GradnetError('block and hidden sizes must be positive')
        if not 0.0 <= dropout < 1.0:
            raise GradnetError(f'dropout ratio {dropout} is not in [0, 1)')
        self.block_sizes = block_sizes
        self.hidden_sizes = hidden_sizes
        self.n_classes = int(n_classes)
        self.wiring = wiring
        self.dropout = float(dropout)
        self.ranges = column_ranges(block_sizes, wiring)
        self.seed = int(seed)
        rng = np.random.RandomState(self.seed)
        with self.init_scope():
            for b, ((start, stop), h) in enumerate(
                    zip(self.ranges, hidden_sizes)):
                # drawn hidden-major, as Linear weights are, then stored
                # transposed (input-major)
                W = np.empty((h, stop - start), dtype=np.float32)
                chainer.initializers.Normal(
                    np.sqrt(2.0 / (stop - start)), rng=rng)(W)
                setattr(self, f'W{b}', chainer.Parameter(
                    np.ascontiguousarray(W.T)))
                setattr(self, f'b{b}', chainer.Parameter(0.0, (h,)))
            if batchnorm:
                self.bn = L.BatchNormalization(sum(hidden_sizes))
            self.out = L.Linear(
                sum(hidden_sizes), self.n_classes,
                initialW=chainer.initializers.LeCunNormal(rng=rng))

    @property
    def n_columns(self):
        return sum(self.block_sizes)

    def config(self):
        """The constructor arguments, JSON-able (saved beside the weights)."""
        return {'block_sizes': self.block_sizes,
                'hidden_sizes': self.hidden_sizes,
                'n_classes': self.n_classes, 'wiring': self.wiring,
                'dropout': self.dropout, 'batchnorm': hasattr(self, 'bn'),
                'seed': self.seed}

    def hidden(self, csr):
        """The hidden layer (rows x sum(hidden_sizes)) before the output."""
        if csr.shape[1] != self.n_columns:
            raise GradnetError(
                f'features have {csr.shape[1]} columns, GradNet expects '
                f'{self.n_columns} (blocks {self.block_sizes})')
        x = to_sparse_matrix(csr)
        parts = []
        for b, (start, stop) in enumerate(self.ranges):
            pre = sparse_matmul(x[:, start:stop], getattr(self, f'W{b}'))
            parts.append(F.bias(pre, getattr(self, f'b{b}')))
        h = F.concat(parts, axis=1)
        if hasattr(self, 'bn'):
            h = self.bn(h)
        h = F.relu(h)
        if self.dropout:
            h = F.dropout(h, self.dropout)
        return h

    def forward(self, csr):
        return self.out(self.hidden(csr))


def predict_from_candidates(outputs, sample):
    """The GradNet prediction rule: per sample, argmax over classes of the
    raw outputs summed over that sample's candidate rows.

    Args:
        outputs: (rows x n_classes) raw outputs, NumPy or CuPy.
        sample: (rows,) int sample id of each row.
    Returns:
        ``(samples, predicted)``: the sorted unique sample ids (int64) and the
        predicted class of each (int64), in the array module of ``outputs``.
    """
    xp = get_array_module(outputs)
    if outputs.ndim != 2 or sample.shape != (outputs.shape[0],):
        raise GradnetError(
            f'outputs {tuple(outputs.shape)} and sample ids '
            f'{tuple(sample.shape)} do not match: need (rows, classes) and '
            f'(rows,)')
    samples, row_group = xp.unique(sample, return_inverse=True)
    summed = xp.zeros((samples.shape[0], outputs.shape[1]), dtype=outputs.dtype)
    xp.add.at(summed, row_group.ravel(), outputs)
    return samples.astype(np.int64), summed.argmax(axis=1).astype(np.int64)


OPTIMIZERS = ('sgd', 'momentum', 'adam')


def make_optimizer(model, name='sgd', lr=0.01, momentum=0.9,
                   weight_decay=0.0):
    """A Chainer optimizer set up on ``model`` (the original: plain SGD,
    lr 0.01)."""
    if name == 'sgd':
        optimizer = chainer.optimizers.SGD(lr=lr)
    elif name == 'momentum':
        optimizer = chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum)
    elif name == 'adam':
        optimizer = chainer.optimizers.Adam(alpha=lr)
    else:
        raise GradnetError(f"unknown optimizer {name!r}: choose one of "
                           f"{', '.join(OPTIMIZERS)}")
    optimizer.setup(model)
    if weight_decay:
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(weight_decay))
    return optimizer


def train_step(model, optimizer, csr, target):
    """One update on a CSR batch with true-label cross-entropy; returns the
    batch loss (float). ``target``: (rows,) int32 in the batch's module."""
    with chainer.using_config('train', True):
        loss = F.softmax_cross_entropy(model(csr), target)
    model.cleargrads()
    loss.backward()
    optimizer.update()
    return float(loss.array)


def candidate_outputs(model, csr):
    """Raw outputs (rows x n_classes) in inference mode, no graph kept."""
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', False):
        return model(csr).array


def evaluate(model, batches, normalizer=None):
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
          eval_every=None, progress=True):
    """The GradNet training loop.

    ``epoch_batches(epoch)`` yields ``(csr, target)`` training batches
    (already normalized, on the model's device); ``evaluate_test()`` returns
    the test accuracy. The test set is evaluated every ``eval_every``
    iterations (None: after every epoch; 0: only at the end) and at the
    end. Returns the history:
    a list of ``{iteration, epoch, train_loss, test_accuracy}`` dicts, where
    ``train_loss`` is the mean batch loss since the previous evaluation.
    """
    history, losses, iteration = [], [], 0

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

    for epoch in range(1, epochs + 1):
        for csr, target in tqdm(epoch_batches(epoch),
                                disable=None if progress else True,
                                desc=f'epoch {epoch}', unit='batch',
                                leave=False):
            losses.append(train_step(model, optimizer, csr, target))
            iteration += 1
            if eval_every and iteration % eval_every == 0:
                record(epoch)
        if eval_every is None:
            record(epoch)
    if not history or history[-1]['iteration'] != iteration:
        record(epochs)
    return history


def save_gradnet(folder, model, normalizer, extra=None):
    """Write ``gradnet.npz`` (weights), ``normalizer.npz`` (and for the
    ``metric`` normalization ``metric.h5``) and ``gradnet.json`` (model
    config + ``extra``) into ``folder``, each file atomically."""
    os.makedirs(folder, exist_ok=True)
    save_snapshot(model, os.path.join(folder, 'gradnet.npz'))
    if normalizer.method == 'metric':
        normalizer.save(folder)
    atomic_write(os.path.join(folder, 'normalizer.npz'),
                 lambda f: np.savez(f, **normalizer.state()))
    text = json.dumps({'config': model.config(), **(extra or {})}, indent=1)
    atomic_write(os.path.join(folder, 'gradnet.json'),
                 lambda f: f.write(text.encode()))


def load_gradnet(folder, device='cpu'):
    """Read a GradNet saved by :func:`save_gradnet`: ``(model, normalizer,
    info)`` with the model on the CPU and a ``metric`` normalizer on
    ``device`` (the device of the batches it will see)."""
    try:
        with open(os.path.join(folder, 'gradnet.json')) as f:
            info = json.load(f)
        with np.load(os.path.join(folder, 'normalizer.npz')) as npz:
            state = dict(npz)
        if str(state['method']) == 'metric':
            normalizer = MetricNormalizer.load(folder, state, device)
        else:
            normalizer = Normalizer.from_state(state)
    except (OSError, ValueError, KeyError) as e:
        raise GradnetError(f'{folder}: not a saved GradNet ({e})') from e
    model = GradNet(**info['config'])
    load_snapshot(model, os.path.join(folder, 'gradnet.npz'))
    return model, normalizer, info


def build_gradnet(block_sizes, n_classes, hidden=None, hidden_total=130,
                  **options):
    """A GradNet with ``hidden`` units per block (a list), or
    ``hidden_total`` units split in proportion to the block sizes.
    ``options``: wiring, dropout, batchnorm, seed."""
    if hidden is None:
        hidden = proportional_hidden_sizes(block_sizes, hidden_total)
    return GradNet(block_sizes, hidden, n_classes, **options)


def store_test_batches(test_store, device, batch=100):
    """``(csr, sample, target)`` batches of a test store on ``device``, all
    candidate rows of each sample read together (for :func:`evaluate`)."""
    for b in test_store.iter_batches(batch, group_by_sample=True):
        yield b.csr.to_device(device), b.sample, b.target


def store_evaluator(model, test_store, normalizer, device):
    """``() -> accuracy`` of ``model`` on a test store."""
    def evaluate_test():
        return evaluate(model, store_test_batches(test_store, device),
                        normalizer)[0]
    return evaluate_test


def store_batches(store, normalizer, batch, seed, device):
    """``epoch -> iterator of (normalized csr, target)`` over a training
    store, shuffled per epoch from ``seed``."""
    def epoch_batches(epoch):
        for b in store.iter_batches(batch, shuffle=True, seed=seed + epoch):
            yield (normalizer(b.csr.to_device(device)),
                   to_device(b.target.astype(np.int32), device))
    return epoch_batches


def store_classes(store):
    """The number of classes recorded in a store's provenance."""
    try:
        return int(store.provenance['n_classes'])
    except KeyError:
        raise GradnetError(f'{store.path}: the store does not record '
                           'n_classes (extract it again)') from None


def online_batches(base, layout, data, q, normalizer, batch, seed, device):
    """Algorithm 1 of the paper without a store: ``epoch -> iterator of
    (normalized csr, target)``, each batch of the gradnet split freshly
    augmented (the dataset's train transform), given new random candidates,
    extracted and sparsified."""
    x, y = data.gradnet

    def epoch_batches(epoch):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(x))
        candidates = rng.integers(0, data.n_classes, size=len(x))
        for csr, _, _, target in iter_sparse_tangents(
                base, x[order], y[order], candidates.astype(np.int32), q,
                layout, device, lambda v: data.train_transform(v, rng),
                batch):
            yield normalizer(csr), target
    return epoch_batches


def online_training_tangents(base, layout, data, q, seed, device, batch=64):
    """``() -> iterator of CSR``: the gradnet split's sparse tangents
    (random candidates from ``seed``, eval transform) on ``device``: what
    the online trainer's normalizer is fitted on."""
    x, y = data.gradnet
    candidates = candidate_plan('random', y, data.n_classes, seed)

    def batches():
        for csr, *_ in iter_sparse_tangents(base, x, y, candidates, q, layout,
                                            device, data.eval_transform,
                                            batch):
            yield csr
    return batches


def fit_normalizer(normalize, power, layout, training_batches, q, device,
                   metric_options=None, stats=None):
    """The normalization ``normalize`` fitted on training features only.

    ``training_batches``: ``() -> iterable of CSR`` on ``device``, one pass
    over the training features; ``stats``: their column statistics when
    already known (a store keeps them), else computed in that pass. ``q``:
    the features' sparsification percentile and ``metric_options``
    (partition, max_block, damping, max_bytes) for ``metric``
    (:meth:`MetricNormalizer.fit`); ``power`` for ``power``.
    """
    if normalize == 'metric':
        return MetricNormalizer.fit(training_batches(), layout, q,
                                    device=device, **(metric_options or {}))
    if stats is None:
        column_stats = ColumnStats(layout.n_params)
        for csr in training_batches():
            column_stats.add(csr)
        stats = column_stats.as_dict()
    return Normalizer.fit(normalize, stats, layout.block_sizes, power)


def online_evaluator(model, base, layout, data, q, normalizer, device,
                     batch=64):
    """``() -> accuracy`` on the test split, its tangents (all candidates)
    extracted on the fly."""
    x, y = data.test

    def evaluate_test():
        batches = ((csr, sample, target) for csr, sample, _, target in
                   iter_sparse_tangents(base, x, y, None, q, layout, device,
                                        data.eval_transform, batch))
        return evaluate(model, batches, normalizer)[0]
    return evaluate_test


def save_learning_curve(history, path):
    """Plot test accuracy and train loss against iterations into a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    iterations = [h['iteration'] for h in history]
    fig, accuracy_axis = plt.subplots(figsize=(6, 4))
    accuracy_axis.plot(iterations, [h['test_accuracy'] for h in history],
                       'o-', color='tab:blue', label='test accuracy')
    accuracy_axis.set_xlabel('iteration')
    accuracy_axis.set_ylabel('test accuracy (all candidates)')
    loss_axis = accuracy_axis.twinx()
    loss_axis.plot(iterations, [h['train_loss'] for h in history], 's--',
                   color='tab:red', label='train loss')
    loss_axis.set_ylabel('train loss')
    fig.legend(loc='lower center', ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stored_metric_normalizer(store, layout, metric_options, device):
    """The ``metric`` normalizer from the sums that ``extract --normalize
    metric`` saved beside the open training ``store``
    (:func:`~gradnet_cupy.metric.load_store_metric`), finalized with the
    ``metric_options`` damping; None when there is no such file, or, with a
    warning saying why, when it does not fit the store or the options."""
    options = dict(metric_options or {})
    damping = options.pop('damping', 1e-3)
    metric, why_not = load_store_metric(store, layout, device=device,
                                        **options)
    if metric is None:
        if why_not:
            warnings.warn(f'{why_not}: accumulating the metric again from '
                          'the store', stacklevel=2)
        return None
    return MetricNormalizer.from_accumulated(
        metric, store.provenance.get('q'), damping)


def fit_stores(train_path, test_path, normalize, power, net_options,
               train_options, device, progress, metric_options=None):
    """GradNet trained on a training store, evaluated on a test store:
    ``(model, normalizer, history)``. The normalizer is fitted on the
    training store (``metric``: the sums saved by ``extract --normalize
    metric`` when they fit, else one pass over its rows; whitened rows are
    re-sparsified at the store's ``q``)."""
    with TangentStore.open(train_path) as train_store, \
            TangentStore.open(test_path) as test_store:
        layout = ParameterLayout.from_dict(train_store.layout)
        block_sizes = layout.block_sizes
        normalizer = None
        if normalize == 'metric':
            normalizer = stored_metric_normalizer(train_store, layout,
                                                  metric_options, device)
        if normalizer is None:
            normalizer = fit_normalizer(
                normalize, power, layout,
                lambda: (b.csr.to_device(device)
                         for b in train_store.iter_batches(256)),
                train_store.provenance.get('q'), device,
                metric_options, stats=train_store.column_stats())
        model = build_gradnet(block_sizes, store_classes(train_store),
                              **net_options)
        history = _train(
            model, device, train_options,
            store_batches(train_store, normalizer, train_options['batch'],
                          train_options['seed'], device),
            store_evaluator(model, test_store, normalizer, device),
            progress)
    return model, normalizer, history


def fit_online(base, layout, data, q, normalize, power, net_options,
               train_options, device, progress, metric_options=None):
    """GradNet trained by Algorithm 1 (no store): ``(model, normalizer,
    history)``. The normalizer is fitted on one pass over the gradnet
    split's tangents (:func:`online_training_tangents`)."""
    seed = train_options['seed']
    normalizer = fit_normalizer(
        normalize, power, layout,
        online_training_tangents(base, layout, data, q, seed, device), q,
        device, metric_options)
    model = build_gradnet(layout.block_sizes, data.n_classes, **net_options)
    history = _train(
        model, device, train_options,
        online_batches(base, layout, data, q, normalizer,
                       train_options['batch'], seed, device),
        online_evaluator(model, base, layout, data, q, normalizer, device),
        progress)
    return model, normalizer, history


def _train(model, device, options, epoch_batches, evaluate_test, progress):
    to_device_model(model, device)
    optimizer = make_optimizer(
        model, options['optimizer'], options['lr'], options['momentum'],
        options['weight_decay'])
    return train(model, optimizer, options['epochs'], epoch_batches,
                 evaluate_test, options['eval_every'], progress)


def save_fit(out, model, normalizer, history, settings):
    """Save a fitted GradNet, its history and learning curve into ``out``;
    returns the summary dict."""
    summary = {'test_accuracy': history[-1]['test_accuracy'],
               'hidden_sizes': model.hidden_sizes, 'out': out}
    model.to_cpu()
    save_gradnet(out, model, normalizer,
                 {'settings': settings, 'history': history,
                  'summary': summary})
    save_learning_curve(history, os.path.join(out, 'learning_curve.png'))
    return summary
