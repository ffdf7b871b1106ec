"""The GradNet model: a shallow block-structured network over sparse tangent
features, and its prediction rule.

The input is a CSR batch of tangent features (rows x n_columns, float32) whose
columns are split into contiguous blocks, one per base-network layer (the
``block_sizes`` of the parameter layout). The first layer is block-structured:
hidden sub-block ``b`` (ReLU) sees only the columns of input block ``b``
(wiring ``diagonal``, the original code) or of blocks ``b`` and ``b + 1``
(wiring ``adjacent``). The concatenated hidden layer feeds a Linear to the
classes. The first layer is computed sparsely (CSR x dense per block, SciPy on
the CPU, cupyx on the GPU) and its weight gradient is ``gy^T X``.

Prediction (docs/method.rst#prediction-over-all-candidates): ``argmax_c sum_ĉ GradNet(t(x, ĉ))_c``, the raw
outputs summed over all candidate rows of a sample
(:func:`predict_from_candidates`). Features of an unsupervised objective
(e.g. an RBM's Fisher scores) have one row per sample and ``candidate =
-1``: the same rule is then the argmax of that row's outputs, no sum.

Neighbours: :mod:`.training` (optimizers and the loop), :mod:`.sources`
(batches from a store or extracted online), :mod:`.persist` (saving),
:mod:`.pipelines` (the two ways ``fit`` trains it).
"""
import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.chainer_compat import chainer, F, L
from gradnet_cupy.errors import GradnetError

WIRINGS = ('diagonal', 'adjacent')


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


def check_wiring(wiring):
    """Raises :class:`GradnetError` unless ``wiring`` is one of
    :data:`WIRINGS`."""
    if wiring not in WIRINGS:
        raise GradnetError(
            f"unknown wiring {wiring!r}: choose one of {', '.join(WIRINGS)}")


def check_dropout(dropout):
    """Raises :class:`GradnetError` unless the dropout ratio is in
    [0, 1)."""
    if not 0.0 <= dropout < 1.0:
        raise GradnetError(f'dropout ratio {dropout} is not in [0, 1)')


def column_ranges(block_sizes, wiring):
    """The input column range ``(start, stop)`` each hidden block sees.

    ``diagonal``: block b's own columns; ``adjacent``: blocks b and b + 1
    (the last block sees only itself). Blocks are contiguous, so either way
    a hidden block reads one contiguous column range.
    """
    check_wiring(wiring)
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

    ``hidden_sizes == [0]`` builds the linear head instead (no hidden
    layer: multinomial logistic regression on the features, ``fit --hidden
    0``), parameters ``W`` (n_columns x n_classes) and ``b``.
    """

    def __init__(self, block_sizes, hidden_sizes, n_classes,
                 wiring='diagonal', dropout=0.0, batchnorm=False, seed=0):
        super().__init__()
        block_sizes = [int(s) for s in block_sizes]
        hidden_sizes = [int(h) for h in hidden_sizes]
        if hidden_sizes == [0]:
            self._init_linear(block_sizes, n_classes, wiring, dropout,
                              batchnorm, seed)
            return
        if len(hidden_sizes) != len(block_sizes):
            raise GradnetError(
                f'{len(hidden_sizes)} hidden sizes given for '
                f'{len(block_sizes)} input blocks: give one per block')
        if min(block_sizes + hidden_sizes) < 1:
            raise GradnetError('block and hidden sizes must be positive')
        check_dropout(dropout)
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

    def _init_linear(self, block_sizes, n_classes, wiring, dropout,
                     batchnorm, seed):
        """``hidden_sizes == [0]``: no hidden layer, a linear classifier
        (multinomial logistic regression) ``x @ W + b`` over all columns;
        ``W`` (n_columns x n_classes, input-major, zeros), ``b``
        (n_classes,)."""
        if min(block_sizes, default=0) < 1:
            raise GradnetError('block and hidden sizes must be positive')
        if dropout or batchnorm:
            raise GradnetError('the linear head (hidden 0) takes neither '
                               'dropout nor batchnorm')
        check_wiring(wiring)
        self.block_sizes, self.hidden_sizes = block_sizes, [0]
        self.n_classes, self.wiring = int(n_classes), wiring
        self.dropout, self.seed = 0.0, int(seed)
        with self.init_scope():
            self.W = chainer.Parameter(
                np.zeros((sum(block_sizes), self.n_classes), np.float32))
            self.b = chainer.Parameter(0.0, (self.n_classes,))

    @property
    def linear(self):
        """True for the linear head (``hidden_sizes == [0]``)."""
        return self.hidden_sizes == [0]

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

    def _matrix(self, csr):
        if csr.shape[1] != self.n_columns:
            raise GradnetError(
                f'features have {csr.shape[1]} columns, GradNet expects '
                f'{self.n_columns} (blocks {self.block_sizes})')
        return to_sparse_matrix(csr)

    def hidden(self, csr):
        """The hidden layer (rows x sum(hidden_sizes)) before the output."""
        x = self._matrix(csr)
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
        if self.linear:
            return F.bias(sparse_matmul(self._matrix(csr), self.W), self.b)
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


def candidate_outputs(model, csr):
    """Raw outputs (rows x n_classes) in inference mode, no graph kept."""
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', False):
        return model(csr).array


def build_gradnet(block_sizes, n_classes, options):
    """The GradNet of a :class:`~gradnet_cupy.options.NetOptions`:
    ``options.hidden`` units per block, or ``options.hidden_total`` units
    split in proportion to the block sizes when ``hidden`` is None."""
    hidden = options.hidden
    if hidden is None:
        hidden = proportional_hidden_sizes(block_sizes, options.hidden_total)
    return GradNet(block_sizes, hidden, n_classes, wiring=options.wiring,
                   dropout=options.dropout, batchnorm=options.batchnorm,
                   seed=options.seed)
