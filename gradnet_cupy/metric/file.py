"""The HDF5 file of a :class:`~.block_metric.BlockMetric` (its one job).

Layout (``h5py``)::

    /                 attrs: format ('gradnet-cupy block metric'),
                      version (1), n_columns, weight_sum, source (JSON)
    /block_starts     int64 (k,)     first column of each block
    /block_sizes      int64 (k,)     length of each block
    /segment_sizes    int64 (m,)     re-sparsification segments
    /G                float64 (packed,)  accumulated sums of the blocks
    /damping          float64 (k,)   lambda_b (finalized metrics only)
    /inverse_sqrt     float32 (packed,)  (G_b / weight_sum + lambda_b I)^-1/2
                                     (finalized metrics only)

``packed = sum size_b ** 2``: the blocks' row-major matrices one after the
other (:attr:`Blocks.offsets`).

Neighbours: :mod:`.block_metric` (:meth:`BlockMetric.save`, ``load`` and
``read_header`` delegate here), :mod:`.stored` (reads the header of a
metric saved beside a store).
"""
import json
import os

from gradnet_cupy.backend import to_numpy
from gradnet_cupy.errors import GradnetError
from gradnet_cupy.kernels import Blocks
from gradnet_cupy.metric.partition import DEFAULT_MAX_BYTES

FILE_FORMAT = 'gradnet-cupy block metric'
FILE_VERSION = 1


def save(metric, path):
    """Writes ``metric`` (a BlockMetric) to the HDF5 file ``path``, replaced
    atomically: written to ``path.tmp``, then renamed (the ``.tmp`` is
    removed when writing fails)."""
    import h5py

    tmp = f'{path}.tmp'
    try:
        with h5py.File(tmp, 'w') as f:
            f.attrs['format'] = FILE_FORMAT
            f.attrs['version'] = FILE_VERSION
            f.attrs['n_columns'] = metric.blocks.n_columns
            f.attrs['weight_sum'] = metric.weight_sum
            f.attrs['source'] = json.dumps(metric.source)
            f['block_starts'] = metric.blocks.starts
            f['block_sizes'] = metric.blocks.sizes
            f['segment_sizes'] = metric.segment_sizes
            f['G'] = to_numpy(metric.G)
            if metric.finalized:
                f['damping'] = metric.damping
                f['inverse_sqrt'] = to_numpy(metric.inverse_sqrt())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def load(cls, path, device='cpu', max_bytes=DEFAULT_MAX_BYTES):
    """The metric of class ``cls`` (BlockMetric) saved by :func:`save` in
    ``path``, on ``device``; a file that is not one raises
    :class:`GradnetError`, so does one whose blocks need more than
    ``max_bytes`` (checked before its packed arrays are read)."""
    with _open_metric_file(path) as f:
        blocks = _file_blocks(f)
        metric = cls(blocks, f['segment_sizes'][()], device, max_bytes)
        G = f['G'][()]
        if G.shape != (blocks.packed_size,):
            raise GradnetError(f'{path}: G has shape {G.shape}, the '
                               f'blocks need ({blocks.packed_size},)')
        finalized = 'inverse_sqrt' in f
        metric._restore(G, float(f.attrs['weight_sum']), _file_source(f),
                        f['damping'][()] if finalized else None,
                        f['inverse_sqrt'][()] if finalized else None)
    return metric


def read_header(path):
    """``(blocks, source)`` of a metric file written by :func:`save`,
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
