"""Column-wise normalizations of sparse tangent features (docs/method.rst#normalization).

One representation of the :class:`~gradnet_cupy.normalize.protocol.Normalizer`
protocol (its sibling: :mod:`gradnet_cupy.normalize.metric`). Every
normalizer here acts on the stored nonzeros of a CSR batch only (the
statistics are *masked*: computed over the nonzeros of each column) and is
fitted on training statistics alone: per-column ``count``, ``min``, ``max``,
``sum`` and ``sumsq`` of the nonzero values (float64 arrays of length
n_columns), as accumulated by :class:`ColumnStats` or stored by the tangent
store.

Methods (:data:`COLUMN_METHODS`):
    ``none``         identity.
    ``scale``        ``(t - min) / range`` per column, range 0 -> 1.
    ``standard``     ``(t - mean) / std`` per column, std 0 -> 1.
    ``standard_l2``  ``standard``, then each row's block scaled to unit L2.
    ``power``        ``sign(t) |t|^p`` (the paper tried p in 1/8, 1/4, 1/2, 2).
    ``scale_power``  ``scale`` then ``power`` with p = 1/2 (the paper's best).

Columns never seen in training (count 0) pass through ``scale`` and
``standard`` unchanged (offset 0, divisor 1).
"""
import numpy as np

from gradnet_cupy.backend import get_array_module, to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import CSR
from gradnet_cupy.normalize.protocol import Normalizer

COLUMN_METHODS = ('none', 'scale', 'standard', 'standard_l2', 'power',
                  'scale_power')
STAT_FIELDS = ('count', 'min', 'max', 'sum', 'sumsq')


class ColumnStats:
    """Per-column statistics of the nonzeros of CSR batches, accumulated on
    the host in float64 (``count`` int64). ``add(csr)`` takes NumPy or CuPy
    CSR batches; ``as_dict()`` returns the five arrays."""

    def __init__(self, n_columns):
        self.n_columns = int(n_columns)
        self.count = np.zeros(self.n_columns, dtype=np.int64)
        self.min = np.full(self.n_columns, np.inf)
        self.max = np.full(self.n_columns, -np.inf)
        self.sum = np.zeros(self.n_columns)
        self.sumsq = np.zeros(self.n_columns)

    def add(self, csr):
        """Add the nonzeros of a CSR batch (NumPy or CuPy); returns self."""
        if csr.shape[1] != self.n_columns:
            raise GradnetError(
                f'batch has {csr.shape[1]} columns, statistics are over '
                f'{self.n_columns}')
        return self.add_entries(to_numpy(csr.indices), to_numpy(csr.data))

    def add_entries(self, columns, values):
        """Add nonzeros given as host arrays of column indices and values."""
        values = values.astype(np.float64)
        n = self.n_columns
        self.count += np.bincount(columns, minlength=n)
        self.sum += np.bincount(columns, values, minlength=n)
        self.sumsq += np.bincount(columns, values * values, minlength=n)
        np.minimum.at(self.min, columns, values)
        np.maximum.at(self.max, columns, values)
        return self

    def as_dict(self):
        return {name: getattr(self, name) for name in STAT_FIELDS}


class ColumnNormalizer(Normalizer):
    """A fitted column-wise normalization: ``normalizer(csr) -> CSR`` (same
    structure, new float32 data, same array module as the input).

    ``offset``, ``divisor``: float32 (n_columns,); ``power``: the exponent
    of ``power``/``scale_power``; ``block_sizes``: int64, the layout's
    per-layer column counts (used by ``standard_l2``).
    """
    methods = COLUMN_METHODS

    def __init__(self, method, offset, divisor, power, block_sizes):
        self.method = method
        self.offset = offset
        self.divisor = divisor
        self.power = power
        self.block_sizes = np.asarray(block_sizes, dtype=np.int64)

    @classmethod
    def fit(cls, features, options):
        """Fitted on ``features.stats``, or on the statistics of one pass
        over ``features.batches()`` when the features do not come with
        them."""
        stats = features.stats
        if stats is None:
            column_stats = ColumnStats(features.layout.n_params)
            for csr in features.batches():
                column_stats.add(csr)
            stats = column_stats.as_dict()
        return cls.from_stats(stats, features.layout.block_sizes, options)

    @classmethod
    def from_stats(cls, stats, block_sizes, options):
        """Fit ``options.method`` from training ``stats`` (dict of
        STAT_FIELDS arrays); ``block_sizes``: the parameter layout's
        per-layer column counts; ``options.power``: the exponent of
        ``power``."""
        method, power = options.method, options.power
        if method not in COLUMN_METHODS:
            raise GradnetError(f"{method!r} is not a column normalization: "
                               f"choose one of {', '.join(COLUMN_METHODS)}")
        missing = [f for f in STAT_FIELDS if f not in stats]
        if missing:
            raise GradnetError(f'column statistics lack {", ".join(missing)}')
        count = np.asarray(stats['count'])
        seen = count > 0
        n_columns = count.shape[0]
        if int(np.sum(block_sizes)) != n_columns:
            raise GradnetError(
                f'block sizes sum to {int(np.sum(block_sizes))}, statistics '
                f'cover {n_columns} columns')
        offset = np.zeros(n_columns)
        divisor = np.ones(n_columns)
        if method in ('scale', 'scale_power'):
            low = np.asarray(stats['min'], dtype=np.float64)
            span = np.asarray(stats['max'], dtype=np.float64) - low
            offset = np.where(seen, low, 0.0)
            divisor = np.where(seen & (span > 0), span, 1.0)
        elif method in ('standard', 'standard_l2'):
            n = np.maximum(count, 1)
            mean = np.asarray(stats['sum'], dtype=np.float64) / n
            var = np.asarray(stats['sumsq'], dtype=np.float64) / n - mean ** 2
            std = np.sqrt(np.maximum(var, 0.0))
            offset = np.where(seen, mean, 0.0)
            divisor = np.where(seen & (std > 0), std, 1.0)
        if method == 'scale_power':
            power = 0.5
        return cls(method, offset.astype(np.float32),
                   divisor.astype(np.float32), float(power), block_sizes)

    def __call__(self, csr):
        xp = get_array_module(csr.data)
        data = csr.data.astype(np.float32, copy=True)
        if self.method in ('scale', 'scale_power', 'standard', 'standard_l2'):
            cols = csr.indices
            data = (data - xp.asarray(self.offset)[cols]) \
                / xp.asarray(self.divisor)[cols]
        if self.method in ('power', 'scale_power'):
            data = xp.sign(data) * xp.abs(data) ** np.float32(self.power)
        if self.method == 'standard_l2':
            data = self._unit_l2_per_block(csr, data, xp)
        return CSR(csr.indptr, csr.indices, data.astype(np.float32),
                   csr.shape)

    def _unit_l2_per_block(self, csr, data, xp):
        """Scale each (row, block) run of ``data`` to unit L2 norm."""
        rows = csr.shape[0]
        n_blocks = len(self.block_sizes)
        offsets = xp.asarray(np.cumsum(self.block_sizes)[:-1])
        block = xp.searchsorted(offsets, csr.indices, side='right')
        row = xp.repeat(xp.arange(rows), xp.diff(csr.indptr).astype(np.int64))
        key = row * n_blocks + block
        sumsq = xp.bincount(key, weights=data.astype(np.float64) ** 2,
                            minlength=rows * n_blocks)
        norm = xp.sqrt(sumsq)
        norm[norm == 0] = 1.0
        return data / norm[key]

    def state(self):
        """A flat dict of NumPy arrays describing this normalizer."""
        return {'method': np.array(self.method), 'offset': self.offset,
                'divisor': self.divisor, 'power': np.array(self.power),
                'block_sizes': self.block_sizes}

    @classmethod
    def load(cls, folder, state, device='cpu'):
        """From :meth:`state` alone (no files of its own; the arrays stay
        on the host and move to each batch's device when applied)."""
        return cls(str(state['method']), np.asarray(state['offset']),
                   np.asarray(state['divisor']), float(state['power']),
                   np.asarray(state['block_sizes']))
