"""The block-diagonal metric of the tangent space and its whitening
(docs/method.rst#the-block-metric): :class:`BlockMetric`.

Its one job is the math. The metric is
``G = sum_i w_i t_i t_i^T / sum_i w_i`` over the training rows; a
:class:`BlockMetric` keeps only its diagonal blocks ``G_b`` over a
:class:`~gradnet_cupy.kernels.Blocks` partition and whitens a row block by
block: ``y_b = (G_b + lambda_b I)^{-1/2} t_b``.

Life cycle: ``accumulate`` CSR batches (NumPy or CuPy, matching the metric's
device) -> ``finalize(damping)`` -> ``apply(csr)``; ``save``/``load`` keep
the accumulated sums and, once finalized, the inverse square roots.

Neighbours: :mod:`.partition` (blocks from a parameter layout, memory
budget), :mod:`.file` (the HDF5 file that :meth:`BlockMetric.save` and
:meth:`BlockMetric.load` delegate to), :mod:`.stored` (the metric saved
beside a tangent store); kernels: :func:`block_outer_accumulate` (the sums),
:func:`percentile_sparsify` (re-sparsifying whitened rows).
"""
import numpy as np

from gradnet_cupy.backend import (array_module, get_array_module,
                                  resolve_device, to_numpy)
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import (CSR, block_outer_accumulate,
                                  percentile_sparsify)
from gradnet_cupy.kernels.csr import check_csr
from gradnet_cupy.kernels.csr import vstack
from gradnet_cupy.metric import file
from gradnet_cupy.metric.partition import (
    DEFAULT_MAX_BLOCK, DEFAULT_MAX_BYTES, DEFAULT_PARTITION, check_memory,
    layout_blocks)

WORK_CHUNK = 1 << 24               # entries of a work array in finalize/apply


class BlockMetric:
    """Block-diagonal metric over ``blocks`` (a :class:`Blocks`).

    ``segment_sizes``: the layer sizes (int, summing to ``n_columns``) that
    the percentile re-sparsification of :meth:`apply` works per; default one
    segment. ``device``: ``'cpu' | 'gpu' | 'auto'``. Raises
    :class:`GradnetError` when the packed blocks need more than ``max_bytes``.

    Attributes: ``G`` float64 (packed,) the weighted sum of ``t_b t_b^T``;
    ``weight_sum`` the sum of the row weights; after :meth:`finalize`,
    ``damping`` float64 (k,) the ``lambda_b`` used per block; ``source``:
    a JSON-able description of the rows accumulated (saved with the metric;
    :func:`~.stored.store_identity` for a store), or None.
    """

    def __init__(self, blocks, segment_sizes=None, device='cpu',
                 max_bytes=DEFAULT_MAX_BYTES):
        check_memory(blocks, max_bytes)
        self.blocks = blocks
        n = blocks.n_columns
        self.segment_sizes = np.asarray(
            [n] if segment_sizes is None else segment_sizes, dtype=np.int64)
        if self.segment_sizes.sum() != n or (self.segment_sizes < 1).any():
            raise GradnetError(
                f'segment sizes must be >= 1 and sum to {n} columns, got '
                f'{self.segment_sizes.tolist()}')
        self.device = resolve_device(device)
        self.xp = array_module(self.device)
        self.G = self.xp.zeros(blocks.packed_size, dtype=np.float64)
        self.weight_sum = 0.0
        self.damping = None
        self.source = None
        self._inverse_sqrt = None   # [(ids int64 (k,), (k, s, s) float32)]

    @classmethod
    def from_layout(cls, layout, partition=DEFAULT_PARTITION,
                    max_block=DEFAULT_MAX_BLOCK, device='cpu',
                    max_bytes=DEFAULT_MAX_BYTES):
        """An empty metric over the features of the
        :class:`~gradnet_cupy.tangent.ParameterLayout` ``layout``: blocks
        and re-sparsification segments (the layout's layer blocks) from
        :func:`~.partition.layout_blocks` (``max_block`` None: no cap)."""
        blocks, sizes = layout_blocks(layout, partition, max_block)
        return cls(blocks, sizes, device, max_bytes)

    @property
    def finalized(self):
        return self._inverse_sqrt is not None

    def accumulate(self, csr, weights=None, method='auto'):
        """Adds ``sum_i w_i t_i[b] t_i[b]^T`` of a CSR batch to ``G``.

        ``weights``: float32 (rows,) of the batch's module, default ones.
        ``method``: see :func:`block_outer_accumulate`. Returns self.
        """
        block_outer_accumulate(csr, self.blocks, self.G, weights,
                               method=method)
        self.weight_sum += (csr.shape[0] if weights is None
                            else float(weights.astype(np.float32).sum(
                                dtype=np.float64)))
        self._inverse_sqrt = self.damping = None
        return self

    def accumulate_batches(self, batches, method='auto'):
        """Accumulates every item of an iterable of CSR batches or of
        ``(csr, weights)`` pairs (e.g. the batches of a tangent store)."""
        for item in batches:
            if isinstance(item, CSR):
                self.accumulate(item, method=method)
            else:
                csr, weights = item
                self.accumulate(csr, weights, method=method)
        return self

    def finalize(self, damping=1e-3, relative=True):
        """Computes ``(G_b / weight_sum + lambda_b I)^{-1/2}`` for every block
        by batched ``eigh`` (equal-size blocks together).

        ``relative``: ``lambda_b = damping * trace(G_b) / size_b`` of the mean
        ``G_b`` (a block no row touched gets ``lambda_b = 1``, i.e. it passes
        through unchanged); else ``lambda_b = damping``. ``damping`` must be
        > 0. Eigenvalues are clipped from below at ``lambda_b`` (``G_b`` is
        positive semi-definite, so only rounding can put them lower).
        Returns self.
        """
        if self.weight_sum <= 0:
            raise GradnetError(
                'the metric has no rows (or zero total weight): accumulate '
                'training batches before finalize')
        if not damping > 0:
            raise GradnetError(f'damping must be > 0, got {damping}')
        xp = self.xp
        damping_per_block = np.zeros(len(self.blocks))
        inverse_sqrt = []
        for ids, size in self._groups():
            mean = self._gather(self.G, ids, size) / self.weight_sum
            eye = xp.eye(size)
            if relative:
                trace = xp.trace(mean, axis1=1, axis2=2) / size
                lam = xp.where(trace > 0, damping * trace, 1.0)
            else:
                lam = xp.full(len(ids), float(damping))
            values, vectors = xp.linalg.eigh(mean + lam[:, None, None] * eye)
            scale = xp.maximum(values, lam[:, None]) ** -0.5
            root = xp.matmul(vectors * scale[:, None, :],
                             vectors.transpose(0, 2, 1))
            inverse_sqrt.append((ids, root.astype(np.float32)))
            damping_per_block[ids] = to_numpy(lam)
        self.damping = damping_per_block
        self._inverse_sqrt = inverse_sqrt
        return self

    def inverse_sqrt(self):
        """The packed ``(G_b / weight_sum + lambda_b I)^{-1/2}``, float32
        (packed,) of the metric's module (after :meth:`finalize`)."""
        self.require_finalized()
        packed = self.xp.zeros(self.blocks.packed_size, dtype=np.float32)
        offsets = self.blocks.on(self.xp).offsets
        for ids, root in self._inverse_sqrt:
            size = root.shape[1]
            target = offsets[self.xp.asarray(ids)][:, None] + \
                self.xp.arange(size * size)
            packed[target.ravel()] = root.reshape(-1)
        return packed

    def apply(self, csr, q=None):
        """Whitens each row: ``y_b = (G_b + lambda_b I)^{-1/2} t_b`` per block;
        columns outside every block pass through unchanged.

        ``csr``: CSR (rows x n_columns) on the metric's device. Returns a CSR
        of the nonzeros of ``y`` (float32; a row block with no nonzero stays
        zero, a touched one is in general dense), or, with ``q``, of ``y``
        re-sparsified per segment by the percentile rule of docs/method.rst#per-layer-sparsification
        (``percentile_sparsify(y, segment_sizes, q)``).

        Rounding: ``y_b`` is a float32 matrix product whose summation order
        the BLAS (cuBLAS) picks per processor, thread count and batch shape,
        so the same row whitened in another batch or chunking agrees to
        float32 rounding, not bit for bit: each entry lies within
        ``gamma_s * sum_j |R_ij t_j|`` of the exact value (``s`` the block
        size, ``gamma_s = s u / (1 - s u)``, ``u = 2^-24``). With ``q`` the
        kept set can then differ at near-ties of the percentile threshold.
        """
        self.require_finalized()
        xp = check_csr(csr, self.blocks.n_columns)
        if xp is not self.xp:
            raise GradnetError(
                f'the CSR batch is not on the metric\'s device ({self.device})')
        n = self.blocks.n_columns
        if q is None and self.diagonal:     # y = t * scale: same structure
            return csr._replace(data=csr.data * self._column_scale()[
                csr.indices])
        step = max(1, WORK_CHUNK // max(n, 1))
        parts = [self._whiten(_dense_rows(csr, first, min(first + step,
                                                          csr.shape[0])))
                 for first in range(0, csr.shape[0], step)]
        if q is not None:
            return vstack([percentile_sparsify(y, self.segment_sizes, q)
                           for y in parts], n, xp)
        return vstack([_csr_of_dense(y) for y in parts], n, xp)

    @property
    def diagonal(self):
        """True when every block is a single column (the diagonal variant)."""
        return bool((self.blocks.sizes == 1).all())

    def _column_scale(self):
        """Diagonal variant: float32 (n,) per-column factor, 1 outside
        the blocks."""
        xp = self.xp
        scale = xp.ones(self.blocks.n_columns, dtype=np.float32)
        starts = self.blocks.on(xp).starts
        for ids, root in self._inverse_sqrt:
            scale[starts[xp.asarray(ids)]] = root[:, 0, 0]
        return scale

    def _whiten(self, rows):
        """``rows`` float32 (m, n) dense -> whitened float32 (m, n)."""
        xp = self.xp
        out = rows.copy()
        starts = self.blocks.on(xp).starts
        for ids, root in self._inverse_sqrt:
            size = root.shape[1]
            columns = starts[xp.asarray(ids)][:, None] + xp.arange(size)
            x = rows[:, columns].transpose(1, 0, 2)           # (k, m, s)
            out[:, columns] = xp.matmul(x, root).transpose(1, 0, 2)
        return out

    def _groups(self):
        """(block ids int64 host, size) per chunk of equal-size blocks, each
        chunk at most WORK_CHUNK packed entries (at least one block)."""
        sizes = self.blocks.sizes
        for size in np.unique(sizes):
            ids = np.flatnonzero(sizes == size)
            step = max(1, WORK_CHUNK // int(size) ** 2)
            for first in range(0, len(ids), step):
                yield ids[first:first + step], int(size)

    def _gather(self, packed, ids, size):
        """Blocks ``ids`` (all of ``size``) of a packed array as (k, s, s)."""
        offsets = self.blocks.on(self.xp).offsets
        index = offsets[self.xp.asarray(ids)][:, None] + \
            self.xp.arange(size * size)
        return packed[index].reshape(len(ids), size, size)

    def require_finalized(self):
        """GradnetError unless :meth:`finalize` has run (what whitening and
        the inverse square roots need)."""
        if not self.finalized:
            raise GradnetError('the metric is not finalized: call finalize() '
                               'after accumulating')


    def _restore(self, G, weight_sum, source, damping=None,
                 inverse_sqrt=None):
        """Sets the state read back from a file (:func:`.file.load`), host
        arrays: ``G`` float64 (packed,); with ``inverse_sqrt`` float32
        (packed,), ``damping`` float64 (k,) (a finalized metric)."""
        self.G = self.xp.asarray(G)
        self.weight_sum = weight_sum
        self.source = source
        if inverse_sqrt is not None:
            self.damping = damping
            packed = self.xp.asarray(inverse_sqrt)
            self._inverse_sqrt = [(ids, self._gather(packed, ids, size))
                                  for ids, size in self._groups()]

    def save(self, path):
        """Writes the metric to the HDF5 file ``path`` (:func:`.file.save`:
        replaced atomically)."""
        file.save(self, path)

    @classmethod
    def load(cls, path, device='cpu', max_bytes=DEFAULT_MAX_BYTES):
        """Reads a metric written by :meth:`save` (:func:`.file.load`); a file
        that is not one raises :class:`GradnetError`."""
        return file.load(cls, path, device, max_bytes)

    @staticmethod
    def read_header(path):
        """``(blocks, source)`` of a metric file written by :meth:`save`,
        without reading its packed arrays (:func:`.file.read_header`)."""
        return file.read_header(path)


def feature_metric(layout, partition=DEFAULT_PARTITION,
                   max_block=DEFAULT_MAX_BLOCK, device='cpu',
                   max_bytes=DEFAULT_MAX_BYTES):
    """:meth:`BlockMetric.from_layout` with the command line's convention
    for ``max_block``: None or 0 means no cap (the metric of ``extract
    --normalize metric`` and of the ``metric`` normalization)."""
    return BlockMetric.from_layout(layout, partition, max_block or None,
                                   device, max_bytes)


def _dense_rows(csr, first, last):
    """Rows ``[first, last)`` of ``csr`` as a dense float32 (m, n) array."""
    xp = get_array_module(csr.data)
    lo, hi = int(csr.indptr[first]), int(csr.indptr[last])
    counts = xp.diff(csr.indptr[first:last + 1])
    row = xp.repeat(xp.arange(last - first), counts)
    out = xp.zeros((last - first, csr.shape[1]), dtype=np.float32)
    out[row, csr.indices[lo:hi]] = csr.data[lo:hi]
    return out


def _csr_of_dense(dense):
    """CSR of the nonzeros of a float32 (m, n) array (same module)."""
    xp = get_array_module(dense)
    mask = dense != 0
    indptr = xp.zeros(dense.shape[0] + 1, dtype=np.int64)
    xp.cumsum(mask.sum(axis=1), out=indptr[1:])
    flat = xp.flatnonzero(mask)
    return CSR(indptr, (flat % dense.shape[1]).astype(np.int32),
               dense.reshape(-1)[flat], dense.shape)
