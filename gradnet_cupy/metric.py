"""``metric`` normalization: block-diagonal ``G^{-1/2}`` whitening (DESIGN §1, §3).

The metric of the tangent space is ``G = sum_i w_i t_i t_i^T / sum_i w_i``
over the training rows. :class:`BlockMetric` keeps only its diagonal blocks
over a partition of the parameter vector and whitens a row block by block:
``y_b = (G_b + lambda_b I)^{-1/2} t_b``.

Partitions (:meth:`BlockMetric.from_layout`), from the parameter *layout*:
a sequence of ``(offset, shape)`` pairs, one per weight array in
parameter-vector order, tiling ``[0, n)`` without gaps (entry ``i`` starts
where entry ``i - 1`` ends; ``size = prod(shape)``):

``per_layer``
    one block per layout entry.
``per_unit``
    one block per output unit: ``W`` of shape ``(out, ...)`` flattened
    row-major holds the fan-in of unit ``u`` (a neuron's inputs, a filter's
    ``in x kh x kw`` taps) at ``offset + u * fan_in + [0, fan_in)``; a 1-D
    entry (a bias) is one block.
``diagonal``
    one block per column (``G_b`` is a number: the diagonal variant).

``max_block`` caps the block size: longer blocks are cut into near-equal
consecutive pieces (:meth:`Blocks.split`).

Memory: ``G`` (float64) and the inverse square roots (float32) take 12 bytes
per packed entry (``sum size_b ** 2``); this is computed before anything is
allocated and checked against ``max_bytes``.

Life cycle: ``accumulate`` CSR batches (NumPy or CuPy, matching the metric's
device) -> ``finalize(damping)`` -> ``apply(csr)``; ``save``/``load`` keep the
accumulated sums and, once finalized, the inverse square roots in HDF5.
"""
import json
import os
from pathlib import Path

import numpy as np

from gradnet_cupy.backend import (array_module, get_array_module,
                                  resolve_device, to_numpy)
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import (CSR, Blocks, block_outer_accumulate,
                                  percentile_sparsify)
from gradnet_cupy.kernels.block_outer import check_csr
from gradnet_cupy.kernels.csr import vstack

PARTITIONS = ('per_layer', 'per_unit', 'diagonal')
BYTES_PER_ENTRY = 8 + 4            # G float64 + inverse square root float32
DEFAULT_MAX_BYTES = 4 << 30
WORK_CHUNK = 1 << 24               # entries of a work array in finalize/apply
FILE_FORMAT = 'gradnet-cupy block metric'
FILE_VERSION = 1


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
    :func:`store_identity` for a store), or None.
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
    def from_layout(cls, layout, partition='per_layer', max_block=None,
                    device='cpu', max_bytes=DEFAULT_MAX_BYTES):
        """A metric whose blocks follow ``layout`` (module docstring)."""
        blocks, sizes = layout_blocks(layout, partition, max_block)
        return cls(blocks, sizes, device, max_bytes)

    @property
    def finalized(self):
        return self._inverse_sqrt is not None

    def accumulate(self, csr, weights=None, method='auto'):
        """Adds ``sum_i w_i t_i[b] t_i[b]^T`` of a CSR batch to ``G``.

        ``weights``: float (rows,) of the batch's module, default ones.
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
        self._require_finalized()
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
        re-sparsified per segment by the percentile rule of DESIGN §1.3
        (``percentile_sparsify(y, segment_sizes, q)``).

        Rounding: ``y_b`` is a float32 matrix product whose summation order
        the BLAS (cuBLAS) picks per processor, thread count and batch shape,
        so the same row whitened in another batch or chunking agrees to
        float32 rounding, not bit for bit: each entry lies within
        ``gamma_s * sum_j |R_ij t_j|`` of the exact value (``s`` the block
        size, ``gamma_s = s u / (1 - s u)``, ``u = 2^-24``). With ``q`` the
        kept set can then differ at near-ties of the percentile threshold.
        """
        self._require_finalized()
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

    def _require_finalized(self):
        if not self.finalized:
            raise GradnetError('the metric is not finalized: call finalize() '
                               'after accumulating')

    def save(self, path):
        """Writes the metric to the HDF5 file ``path`` (replaced atomically:
        written to ``path.tmp``, then renamed)."""
        import h5py

        tmp = f'{path}.tmp'
        with h5py.File(tmp, 'w') as f:
            f.attrs['format'] = FILE_FORMAT
            f.attrs['version'] = FILE_VERSION
            f.attrs['n_columns'] = self.blocks.n_columns
            f.attrs['weight_sum'] = self.weight_sum
            f.attrs['source'] = json.dumps(self.source)
            f['block_starts'] = self.blocks.starts
            f['block_sizes'] = self.blocks.sizes
            f['segment_sizes'] = self.segment_sizes
            f['G'] = to_numpy(self.G)
            if self.finalized:
                f['damping'] = self.damping
                f['inverse_sqrt'] = to_numpy(self.inverse_sqrt())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, device='cpu', max_bytes=DEFAULT_MAX_BYTES):
        """Reads a metric written by :meth:`save`; a file that is not one
        raises :class:`GradnetError`."""
        with _open_metric_file(path) as f:
            blocks = _file_blocks(f)
            metric = cls(blocks, f['segment_sizes'][()], device, max_bytes)
            G = f['G'][()]
            if G.shape != (blocks.packed_size,):
                raise GradnetError(f'{path}: G has shape {G.shape}, the '
                                   f'blocks need ({blocks.packed_size},)')
            metric.G = metric.xp.asarray(G)
            metric.weight_sum = float(f.attrs['weight_sum'])
            metric.source = _file_source(f)
            if 'inverse_sqrt' in f:
                metric.damping = f['damping'][()]
                packed = metric.xp.asarray(f['inverse_sqrt'][()])
                metric._inverse_sqrt = [
                    (ids, metric._gather(packed, ids, size))
                    for ids, size in metric._groups()]
        return metric

    @staticmethod
    def read_header(path):
        """``(blocks, source)`` of a metric file written by :meth:`save`,
        without reading its packed arrays."""
        with _open_metric_file(path) as f:
            return _file_blocks(f), _file_source(f)


def _open_metric_file(path):
    """The open h5py file of a metric written by :meth:`BlockMetric.save`;
    a file that is not one raises :class:`GradnetError`."""
    import h5py

    try:
        f = h5py.File(path, 'r')
    except OSError as error:
        raise GradnetError(f'cannot open metric file {path}: {error}')
    if f.attrs.get('format') != FILE_FORMAT:
        f.close()
        raise GradnetError(f'{path} is not a {FILE_FORMAT} file')
    if f.attrs['version'] != FILE_VERSION:
        version = f.attrs['version']
        f.close()
        raise GradnetError(f'{path}: unsupported metric file version '
                           f'{version} (this code reads {FILE_VERSION})')
    return f


def _file_blocks(f):
    return Blocks(f['block_starts'][()], f['block_sizes'][()],
                  int(f.attrs['n_columns']))


def _file_source(f):
    return json.loads(f.attrs.get('source', 'null'))


def layout_blocks(layout, partition='per_layer', max_block=None):
    """(:class:`Blocks`, segment sizes int64) of a parameter ``layout``
    (sequence of ``(offset, shape)``) for ``partition`` and ``max_block``."""
    if partition not in PARTITIONS:
        raise GradnetError(f"unknown partition {partition!r}: choose one of "
                           f"{', '.join(PARTITIONS)}")
    starts, sizes, segments = [], [], []
    end = 0
    for i, (offset, shape) in enumerate(layout):
        shape = tuple(int(d) for d in shape)
        size = int(np.prod(shape))
        if offset != end or size < 1:
            raise GradnetError(
                f'layout entry {i} (offset {offset}, shape {shape}) must '
                f'start at {end}, where the previous one ends, and have '
                f'size >= 1')
        if partition == 'per_unit' and len(shape) >= 2:
            fan_in = size // shape[0]
            starts.extend(offset + fan_in * np.arange(shape[0]))
            sizes.extend([fan_in] * shape[0])
        else:
            starts.append(offset)
            sizes.append(size)
        segments.append(size)
        end = offset + size
    if not segments:
        raise GradnetError('the parameter layout is empty')
    blocks = Blocks(np.array(starts, dtype=np.int64), sizes, end)
    if partition == 'diagonal':
        blocks = blocks.split(1)
    elif max_block is not None:
        blocks = blocks.split(max_block)
    return blocks, np.asarray(segments, dtype=np.int64)


def feature_metric(layout, partition='per_unit', max_block=256, device='cpu',
                   max_bytes=DEFAULT_MAX_BYTES):
    """An empty :class:`BlockMetric` over tangent features of the
    :class:`~gradnet_cupy.tangent.ParameterLayout` ``layout``: blocks from
    ``partition`` and ``max_block`` (None or 0: no cap), re-sparsification
    segments = the layout's layer blocks."""
    return BlockMetric(feature_blocks(layout, partition, max_block),
                       layout.block_sizes, device, max_bytes)


def feature_blocks(layout, partition='per_unit', max_block=256):
    """The :class:`Blocks` of :func:`feature_metric`."""
    return layout_blocks([(e.offset, e.shape) for e in layout.entries],
                         partition, max_block or None)[0]


def store_metric_path(store_path):
    """Where ``extract --normalize metric`` keeps the accumulated metric of
    the store ``STORE.h5``: ``STORE.metric.h5`` beside it."""
    path = Path(store_path)
    return path.with_name(path.stem + '.metric.h5')


def store_identity(store):
    """What identifies the rows of an open TangentStore (its provenance,
    with the creation time, row and nonzero counts): the ``source`` of a
    metric accumulated from it."""
    return {'store_provenance': store.provenance, 'rows': len(store),
            'nnz': store.nnz}


def save_store_metric(metric, store):
    """Saves ``metric``, accumulated over every row of the open
    TangentStore ``store``, to :func:`store_metric_path`; returns the
    path."""
    metric.source = store_identity(store)
    path = store_metric_path(store.path)
    metric.save(path)
    return path


def load_store_metric(store, layout, partition='per_unit', max_block=256,
                      device='cpu', max_bytes=DEFAULT_MAX_BYTES):
    """``(metric, None)``: the accumulated metric saved beside the open
    TangentStore ``store`` by ``extract --normalize metric``, when it was
    accumulated from exactly these rows and has the blocks of
    ``partition``/``max_block``; ``(None, why not)`` when it does not;
    ``(None, None)`` when there is no such file."""
    path = store_metric_path(store.path)
    if not path.exists():
        return None, None
    blocks, source = BlockMetric.read_header(path)
    if source != json.loads(json.dumps(store_identity(store))):
        return None, f'{path} was accumulated from other rows than {store.path}'
    if blocks != feature_blocks(layout, partition, max_block):
        return None, (f'{path} has other blocks than partition={partition} '
                      f'max_block={max_block}')
    return BlockMetric.load(path, device, max_bytes), None


def packed_size_with_cap(sizes, cap):
    """``sum size ** 2`` after cutting blocks of ``sizes`` at ``cap``
    (as :meth:`Blocks.split` does)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pieces = -(-sizes // cap)
    base, extra = np.divmod(sizes, pieces)
    return int(((pieces - extra) * base ** 2 + extra * (base + 1) ** 2).sum())


def check_memory(blocks, max_bytes):
    """Raises :class:`GradnetError` when the metric of ``blocks`` needs more
    than ``max_bytes``, naming the largest block-size cap that fits and the
    size of the diagonal variant."""
    need = blocks.packed_size * BYTES_PER_ENTRY
    if need <= max_bytes:
        return
    largest = int(blocks.sizes.max())
    low, high = 0, largest          # the largest fitting cap lies in [low, high)
    while high - low > 1:
        mid = (low + high) // 2
        fits = packed_size_with_cap(blocks.sizes, mid) * BYTES_PER_ENTRY
        low, high = (mid, high) if fits <= max_bytes else (low, mid)
    diagonal = blocks.covered * BYTES_PER_ENTRY
    if low >= 1:
        advice = (f'max_block={low} fits '
                  f'({_size(packed_size_with_cap(blocks.sizes, low) * BYTES_PER_ENTRY)})'
                  f', so does the diagonal partition ({_size(diagonal)})')
    elif diagonal <= max_bytes:
        advice = f'only the diagonal partition fits ({_size(diagonal)})'
    else:
        advice = (f'not even the diagonal partition fits '
                  f'({_size(diagonal)}): raise max_bytes')
    raise GradnetError(
        f'the block-diagonal metric needs {_size(need)} ({len(blocks)} blocks '
        f'of sizes up to {largest}, {blocks.packed_size} packed entries at '
        f'{BYTES_PER_ENTRY} bytes) but max_bytes is {_size(max_bytes)}; '
        f'{advice}')


def _size(nbytes):
    for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
        if nbytes < 1024 or unit == 'GiB':
            return (f'{nbytes:.1f} {unit}' if unit != 'bytes'
                    else f'{int(nbytes)} bytes')
        nbytes /= 1024


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


class MetricNormalizer:
    """The ``metric`` normalization of DESIGN §1.4: ``normalizer(csr) ->
    CSR``, each row whitened by a finalized :class:`BlockMetric` and
    re-sparsified per base-network layer block with the percentile rule at
    ``q`` (the extraction's), so that GradNet's input stays sparse.

    ``metric``: a finalized BlockMetric whose ``segment_sizes`` are the
    layer blocks; ``q``: float in (0, 100). Input batches must be on the
    metric's device.
    """
    method = 'metric'
    FILE = 'metric.h5'

    def __init__(self, metric, q):
        metric._require_finalized()
        self.metric = metric
        self.q = float(q)

    @classmethod
    def fit(cls, batches, layout, q, partition='per_unit', max_block=256,
            damping=1e-3, device='cpu', max_bytes=DEFAULT_MAX_BYTES):
        """Fits the metric on one pass over the training ``batches`` (an
        iterable of CSR on ``device``, every row weight 1).

        ``layout``: the :class:`~gradnet_cupy.tangent.ParameterLayout` of
        the features; ``partition``/``max_block`` (None or 0: no cap) as in
        :meth:`BlockMetric.from_layout`; ``damping``: relative
        (``lambda_b = damping * trace(G_b) / size_b``).
        """
        _check_q(q)
        metric = feature_metric(layout, partition, max_block, device,
                                max_bytes)
        return cls.from_accumulated(metric.accumulate_batches(batches), q,
                                    damping)

    @classmethod
    def from_accumulated(cls, metric, q, damping=1e-3):
        """The normalizer of a :class:`BlockMetric` that holds the training
        rows' sums (e.g. one ``extract --normalize metric`` accumulated),
        finalized here with relative ``damping``."""
        _check_q(q)
        return cls(metric.finalize(damping, relative=True), q)

    def __call__(self, csr):
        return self.metric.apply(csr, self.q)

    def state(self):
        """The flat dict saved as ``normalizer.npz`` (the blocks go to
        :attr:`FILE` beside it, see :meth:`save`)."""
        return {'method': np.array(self.method), 'q': np.array(self.q)}

    def save(self, folder):
        """Writes the metric to ``folder/metric.h5`` (atomically)."""
        self.metric.save(os.path.join(folder, self.FILE))

    @classmethod
    def load(cls, folder, state, device='cpu'):
        """The normalizer saved in ``folder`` with ``state`` (its
        normalizer.npz), the metric on ``device``."""
        return cls(BlockMetric.load(os.path.join(folder, cls.FILE), device),
                   float(state['q']))


def _check_q(q):
    if q is None or not 0 < q < 100:
        raise GradnetError(
            f'the metric needs the features\' sparsification percentile q '
            f'in (0, 100), got {q} (a store records it when extracted)')
