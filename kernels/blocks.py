"""Diagonal blocks of a square matrix over the parameter vector.

A :class:`Blocks` is a list of contiguous column ranges
``[start_b, start_b + size_b)`` of a vector of ``n_columns`` entries, in
ascending column order and without overlaps. The ranges may cover all columns
(a partition) or only some of them. The dense ``size_b x size_b`` matrices of
the blocks are stored *packed*: block ``b`` occupies
``G[offsets[b] : offsets[b + 1]]`` of a 1-D array, row-major, so that
``G[offsets[b]:offsets[b + 1]].reshape(size_b, size_b)`` is ``G_b`` and
``offsets[-1] == sum(size_b ** 2)`` is the packed length.
"""
import numpy as np

from gradnet_cupy.backend import get_array_module
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels._cuda import device_constants


class Blocks:
    """Validated block ranges (host NumPy arrays; small).

    ``starts``, ``sizes``: int64 (k,); ``offsets``: int64 (k + 1,) packed
    offsets; ``n_columns``: the vector length the ranges live in.
    """

    def __init__(self, starts, sizes, n_columns):
        starts = np.asarray(starts)
        sizes = np.asarray(sizes)
        if starts.ndim != 1 or sizes.ndim != 1 or starts.shape != sizes.shape:
            raise GradnetError(
                f'block starts and sizes must be 1-D of one length, got '
                f'shapes {starts.shape} and {sizes.shape}')
        for name, values in (('starts', starts), ('sizes', sizes)):
            if values.size and not np.issubdtype(values.dtype, np.integer):
                raise GradnetError(
                    f'block {name} must be integers, got dtype {values.dtype}')
        self.starts = starts.astype(np.int64)
        self.sizes = sizes.astype(np.int64)
        self.n_columns = int(n_columns)
        self._check()
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes ** 2, out=self.offsets[1:])
        self._device_cache = {}

    @classmethod
    def contiguous(cls, sizes, n_columns=None):
        """Consecutive blocks of ``sizes`` starting at column 0.

        ``n_columns`` defaults to ``sum(sizes)`` (a partition).
        """
        sizes = np.asarray(sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        total = int(sizes.sum())
        return cls(starts, sizes, total if n_columns is None else n_columns)

    def _check(self):
        if self.n_columns < 0:
            raise GradnetError(f'n_columns must be >= 0, got {self.n_columns}')
        bad = np.flatnonzero(self.sizes < 1)
        if bad.size:
            raise GradnetError(
                f'block {bad[0]} has size {self.sizes[bad[0]]}; every block '
                f'needs size >= 1')
        bad = np.flatnonzero((self.starts < 0)
                             | (self.starts + self.sizes > self.n_columns))
        if bad.size:
            b = bad[0]
            raise GradnetError(
                f'block {b} = columns [{self.starts[b]}, '
                f'{self.starts[b] + self.sizes[b]}) is out of range for '
                f'{self.n_columns} columns')
        ends = self.starts + self.sizes
        bad = np.flatnonzero(self.starts[1:] < ends[:-1])
        if bad.size:
            b = bad[0]
            raise GradnetError(
                f'blocks {b} = [{self.starts[b]}, {ends[b]}) and {b + 1} = '
                f'[{self.starts[b + 1]}, {ends[b + 1]}) overlap or are not '
                f'in ascending column order')

    def __len__(self):
        return len(self.sizes)

    def __eq__(self, other):
        return (isinstance(other, Blocks) and self.n_columns == other.n_columns
                and np.array_equal(self.starts, other.starts)
                and np.array_equal(self.sizes, other.sizes))

    def __repr__(self):
        low, high = ((self.sizes.min(), self.sizes.max()) if len(self)
                     else (0, 0))
        return (f'Blocks({len(self)} blocks, sizes {low}..{high}, '
                f'{self.covered} of '
                f'{self.n_columns} columns, packed {self.packed_size})')

    @property
    def packed_size(self):
        """Entries of the packed dense blocks: ``sum(size_b ** 2)``."""
        return int(self.offsets[-1])

    @property
    def covered(self):
        """How many columns lie in some block."""
        return int(self.sizes.sum())

    def column_block(self, columns):
        """Block id (int64) of each column of ``columns``, -1 outside blocks.

        ``columns``: int array of NumPy or CuPy (the result is of the same
        module).
        """
        xp = get_array_module(columns)
        starts = self.on(xp).starts
        ends = starts + self.on(xp).sizes
        block = xp.searchsorted(starts, columns, side='right') - 1
        safe = xp.maximum(block, 0)
        inside = (block >= 0) & (columns < ends[safe])
        return xp.where(inside, block, -1)

    def split(self, max_size):
        """The same columns with every block longer than ``max_size`` cut
        into ``ceil(size / max_size)`` consecutive pieces of near-equal size
        (sizes differ by at most one, larger pieces first)."""
        max_size = int(max_size)
        if max_size < 1:
            raise GradnetError(f'maximum block size must be >= 1, got {max_size}')
        pieces = -(-self.sizes // max_size)
        parent = np.repeat(np.arange(len(self)), pieces)
        first = np.concatenate([[0], np.cumsum(pieces)[:-1]])
        rank = np.arange(len(parent)) - first[parent]
        base, extra = np.divmod(self.sizes[parent], pieces[parent])
        sizes = base + (rank < extra)
        before = rank * base + np.minimum(rank, extra)
        return Blocks(self.starts[parent] + before, sizes, self.n_columns)

    def on(self, xp):
        """``starts``/``sizes``/``offsets`` as arrays of module ``xp``
        (NumPy: self; CuPy: read-only copies cached per device by
        :func:`~gradnet_cupy.kernels._cuda.device_constants`, whose first
        upload on a device waits for its copy)."""
        if xp is np:
            return self
        key = (xp.__name__, xp.cuda.Device().id)
        if key not in self._device_cache:
            self._device_cache[key] = _DeviceBlocks(*device_constants(
                (self.starts, self.sizes, self.offsets), xp))
        return self._device_cache[key]


class _DeviceBlocks:
    """``starts``, ``sizes``, ``offsets`` of a :class:`Blocks` on a GPU."""

    def __init__(self, starts, sizes, offsets):
        self.starts, self.sizes, self.offsets = starts, sizes, offsets
